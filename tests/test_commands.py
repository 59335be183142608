"""The command service: permissions, refusals, results, expiry, schedules and pauses."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth.models import Group, User
from django.utils import timezone

import protocol
from elections import actions, commands
from elections.models import AuditEntry, Command, Election

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def join(agent: str, name: str = "billing/cluster") -> None:
    actions.register_agent(
        protocol.Hello(
            agent=agent, elections=[protocol.ElectionInfo(name=name, backend="raft", ttl=1)]
        )
    )


def lead(agent: str, token: int, seq: int = 1, name: str = "billing/cluster") -> None:
    event = {
        "seq": seq,
        "election": name,
        "from": "candidate",
        "to": "leader",
        "token": token,
        "at": T0,
    }
    actions.ingest_events(agent, [protocol.Event.model_validate(event)])


def follow(agent: str, seq: int = 1, name: str = "billing/cluster") -> None:
    event = {
        "seq": seq,
        "election": name,
        "from": "candidate",
        "to": "follower",
        "token": 1,
        "at": T0,
    }
    actions.ingest_events(agent, [protocol.Event.model_validate(event)])


@pytest.fixture
def operator() -> User:
    user = User.objects.create_user("oncall", password="x" * 12)
    user.groups.add(Group.objects.get(name="operators"))
    return User.objects.get(pk=user.pk)  # fresh: permissions are cached per instance


@pytest.fixture
def cluster() -> None:
    for agent in ("a", "b", "c"):
        join(agent)
    lead("a", 7)
    follow("b")
    follow("c")


def ask(user: User, **kw: object) -> Command:
    return commands.request_stepdown(
        user, commands.Request(election=kw.pop("election", "billing/cluster"), reason="test", **kw)
    )


def test_the_operators_group_grants_the_permission(operator: User) -> None:
    assert operator.has_perm("elections.force_stepdown")


def test_it_refuses_without_the_permission(cluster: None) -> None:
    viewer = User.objects.create_user("viewer", password="x" * 12)
    with pytest.raises(commands.Refused) as info:
        ask(viewer)
    assert info.value.status == 403
    assert not Command.objects.exists()
    refused = AuditEntry.objects.get(action="step-down-refused")
    assert refused.actor == "viewer" and "permission" in refused.detail["why"]


def test_it_refuses_unknown_elections_and_missing_reasons(operator: User, cluster: None) -> None:
    with pytest.raises(commands.Refused) as info:
        ask(operator, election="no/such")
    assert info.value.status == 404
    with pytest.raises(commands.Refused) as info:
        commands.request_stepdown(
            operator, commands.Request(election="billing/cluster", reason=" ")
        )
    assert info.value.status == 400


def test_it_refuses_when_no_healthy_candidate_could_take_over(
    operator: User, cluster: None
) -> None:
    actions.agent_disconnected("b")
    actions.agent_disconnected("c")
    with pytest.raises(commands.Refused) as info:
        ask(operator)
    assert info.value.status == 412
    assert "no healthy candidate" in info.value.message
    forced = ask(operator, force=True)
    assert forced.status == "sent" and forced.forced


def test_a_successor_must_be_a_healthy_candidate(operator: User, cluster: None) -> None:
    actions.agent_disconnected("c")
    with pytest.raises(commands.Refused) as info:
        ask(operator, successor="c")
    assert info.value.status == 412
    assert ask(operator, successor="b").kind == "switchover"


def test_an_offline_leader_fails_at_once(operator: User, cluster: None) -> None:
    actions.agent_disconnected("a")
    command = ask(operator)
    assert command.status == "failed"
    assert command.result == "the leader a is offline"
    assert AuditEntry.objects.filter(action="command-failed", target="billing/cluster").exists()


def test_done_needs_a_new_leader_with_a_newer_token(operator: User, cluster: None) -> None:
    command = ask(operator)
    assert command.status == "sent" and command.target_id == "a" and command.old_token == 7
    # An answer from another agent cannot finish it.
    assert commands.record_result("b", protocol.Result(command=command.pk, ok=True)) is None
    same_token = protocol.Result(command=command.pk, ok=True, detail="?", token=7, leader="b")
    assert commands.record_result("a", same_token).status == "failed"

    command = ask(operator, drill=True)
    result = protocol.Result(
        command=command.pk, ok=True, detail="b leads now", token=8, leader="b", gap=0.12
    )
    done = commands.record_result("a", result)
    assert (done.status, done.new_token, done.new_leader, done.leaderless_gap) == (
        "done",
        8,
        "b",
        0.12,
    )
    entry = AuditEntry.objects.filter(action="command-done").get()
    assert (entry.actor_type, entry.actor, entry.detail["new_token"]) == ("agent", "a", 8)


def test_one_command_at_a_time(operator: User, cluster: None) -> None:
    ask(operator)
    with pytest.raises(commands.Refused) as info:
        ask(operator)
    assert info.value.status == 409


def test_unanswered_commands_expire(operator: User, cluster: None) -> None:
    command = ask(operator)
    assert commands.expire() == []
    Command.objects.filter(pk=command.pk).update(sent_at=timezone.now() - timedelta(minutes=1))
    assert commands.expire() == [command.pk]
    command.refresh_from_db()
    assert command.status == "expired"


def test_a_paused_election_refuses_commands(operator: User, cluster: None) -> None:
    with pytest.raises(commands.Refused):
        commands.set_paused(operator, "billing/cluster", True, "")  # a reason is required
    commands.set_paused(operator, "billing/cluster", True, "db migration")
    assert Election.objects.get().paused
    with pytest.raises(commands.Refused) as info:
        ask(operator)
    assert info.value.status == 409 and "paused" in info.value.message
    commands.set_paused(operator, "billing/cluster", False)
    assert ask(operator).status == "sent"
    assert list(
        AuditEntry.objects.filter(action__in=["paused", "resumed"]).values_list("action", flat=True)
    ) == [
        "paused",
        "resumed",
    ]


def test_a_scheduled_switchover_runs_when_due_and_can_be_cancelled(
    operator: User, cluster: None
) -> None:
    later = timezone.now() + timedelta(hours=1)
    command = ask(operator, successor="b", at=later)
    assert command.status == "scheduled"
    assert commands.run_due() == []
    commands.cancel(operator, command.pk)
    command.refresh_from_db()
    assert command.status == "cancelled"
    with pytest.raises(commands.Refused):
        commands.cancel(operator, command.pk)

    soon = ask(operator, successor="b", at=timezone.now() + timedelta(hours=1))
    Command.objects.filter(pk=soon.pk).update(scheduled_for=timezone.now() - timedelta(seconds=1))
    assert commands.run_due() == [soon.pk]
    soon.refresh_from_db()
    assert soon.status == "sent"


@pytest.mark.parametrize("hold_off", [-1, float("nan"), float("inf"), 1e9])
def test_a_hold_off_out_of_range_is_refused(operator: User, cluster: None, hold_off) -> None:
    with pytest.raises(commands.Refused) as info:
        ask(operator, hold_off=hold_off)
    assert info.value.status == 400 and "hold_off" in info.value.message
    with pytest.raises(commands.Refused):  # scheduled ones too: checked before anything runs
        ask(operator, hold_off=hold_off, successor="b", at=timezone.now() + timedelta(hours=1))
    assert not Command.objects.exists()
