"""Heartbeats that change nothing are batched: one flush writes every agent's liveness."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

import protocol
from elections import actions, heartbeats, liveness
from elections.models import Agent, Election, Membership
from tests.helpers import hello

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def beat(**states: protocol.ElectionState) -> protocol.Heartbeat:
    return protocol.Heartbeat(at=T0, states={k.replace("_", "/"): v for k, v in states.items()})


def leading(agent: str, token: int = 1, ttl_left: float = 5) -> protocol.ElectionState:
    return protocol.ElectionState(state="leader", leader=agent, token=token, ttl_left=ttl_left)


def following(leader: str, token: int = 1) -> protocol.ElectionState:
    return protocol.ElectionState(state="follower", leader=leader, token=token)


def test_a_heartbeat_is_split_into_changed_views_and_mere_renewals() -> None:
    session = actions.register_agent(hello("a", "e/1", "e/2"))
    now = timezone.now()
    changed, renewed = heartbeats.rows(session.members, beat(e_1=leading("a")), now)
    assert [(r.view.state, r.lease_expires) for r in changed] == [
        ("leader", now + timedelta(seconds=5))
    ]
    assert renewed == []
    heartbeats.write_views("a", changed)
    members = heartbeats.members_of("a")
    again, renewed = heartbeats.rows(members, beat(e_1=leading("a", ttl_left=4)), now)
    assert again == [] and [r.claims for r in renewed] == [True]


def test_one_flush_writes_a_hundred_agents_with_the_same_statements_as_one() -> None:
    for i in range(100):
        actions.register_agent(hello(f"a{i}", "e/1"), session=f"s{i}")
    memberships = dict(Membership.objects.values_list("agent_id", "pk"))
    election = Election.objects.get().pk
    later = timezone.now() + timedelta(seconds=30)

    def pending(agents: list[str]) -> liveness.Pending:
        buffer = liveness.Liveness()
        for agent in agents:
            buffer.seen(agent, f"s{agent[1:]}", later)
            buffer.lease(memberships[agent], election, later, claims=False)
        return buffer.take()

    def cost(agents: list[str]) -> int:
        with CaptureQueriesContext(connection) as queries:
            liveness.flush(pending(agents))
        return len(queries.captured_queries)

    assert cost(["a0"]) == cost([f"a{i}" for i in range(100)])
    assert set(Agent.objects.values_list("last_seen", flat=True)) == {later}
    assert set(Membership.objects.values_list("lease_expires", flat=True)) == {later}


def test_a_flush_after_a_disconnect_does_not_bring_the_agent_back() -> None:
    actions.register_agent(hello("a", "e/1"), session="s1")
    buffer = liveness.Liveness()
    buffer.seen("a", "s1", timezone.now())
    pending = buffer.take()
    actions.agent_disconnected("a", "s1")  # the socket closed while the flush was on its way
    liveness.flush(pending)
    assert not Agent.objects.get(pk="a").connected


def test_an_agent_marked_stale_while_alive_comes_back_with_its_claims() -> None:
    actions.register_agent(hello("a", "e/1"), session="s1")
    heartbeats.record_heartbeat("a", beat(e_1=leading("a")))
    Agent.objects.filter(pk="a").update(last_seen=T0)
    assert actions.mark_stale_agents(15) == ["a"]
    assert Election.objects.get().status == "leaderless"
    buffer = liveness.Liveness()
    buffer.seen("a", "s1", timezone.now())
    liveness.flush(buffer.take())
    assert Agent.objects.get(pk="a").connected
    assert Election.objects.get().status == "led"


def test_renewals_alone_can_reveal_a_split_brain() -> None:
    for agent in ("a", "b"):
        actions.register_agent(hello(agent, "e/1"), session=agent)
        heartbeats.record_heartbeat(agent, beat(e_1=leading(agent)))
    assert Election.objects.get().status == "split-brain"
    # b's lease ran out: the periodic refresh clears the split brain.
    Membership.objects.filter(agent_id="b").update(lease_expires=T0)
    actions.refresh_all_statuses()
    assert Election.objects.get().status == "led"
    # b renews without any change of view: only the flush sees it.
    member = Membership.objects.get(agent_id="b")
    buffer = liveness.Liveness()
    buffer.lease(member.pk, member.election_id, timezone.now() + timedelta(seconds=5), True)
    assert liveness.flush(buffer.take()) == [member.election_id]
    assert Election.objects.get().status == "split-brain"


def test_a_lease_turning_late_is_a_change_and_staying_late_a_renewal() -> None:
    session = actions.register_agent(hello("a", "e/1"))  # ttl 1 s: late below a third
    now = timezone.now()
    changed, _ = heartbeats.rows(session.members, beat(e_1=leading("a", ttl_left=0.9)), now)
    heartbeats.write_views("a", changed)
    members = heartbeats.members_of("a")
    assert not Membership.objects.get().lease_late
    late, renewed = heartbeats.rows(members, beat(e_1=leading("a", ttl_left=0.3)), now)
    assert [r.late for r in late] == [True] and renewed == []
    heartbeats.write_views("a", late)
    assert Membership.objects.get().lease_late
    members = heartbeats.members_of("a")
    again, renewed = heartbeats.rows(members, beat(e_1=leading("a", ttl_left=0.2)), now)
    assert again == [] and [r.late for r in renewed] == [True]
    # A follower's lease is nobody's concern: never late.
    changed, _ = heartbeats.rows(members, beat(e_1=following("b")), now)
    assert [r.late for r in changed] == [False]


def test_clock_skew_is_written_by_the_flush_with_the_same_statements() -> None:
    for i in range(100):
        actions.register_agent(hello(f"a{i}", "e/1"), session=f"s{i}")
    now = timezone.now()

    def cost(agents: list[str]) -> int:
        buffer = liveness.Liveness()
        for agent in agents:
            buffer.seen(agent, f"s{agent[1:]}", now, skew=int(agent[1:]) / 10)
        with CaptureQueriesContext(connection) as queries:
            liveness.flush(buffer.take())
        return len(queries.captured_queries)

    assert cost(["a0"]) == cost([f"a{i}" for i in range(100)])
    assert Agent.objects.get(pk="a42").clock_skew == pytest.approx(4.2)
    # A crossing of the threshold is kept until flushed, even if a later beat did not cross.
    buffer = liveness.Liveness()
    buffer.seen("a1", "s1", now, skew=1.5, skew_flipped=True)
    buffer.seen("a1", "s1", now, skew=1.6)
    assert buffer.take().seen["a1"].skew_flipped
