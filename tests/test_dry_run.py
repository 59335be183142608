"""Switchover dry run: every member judged, nothing written or sent; the real switchover uses
the same judgement, so the two can never disagree."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.contrib.auth.models import Group, User
from django.core.management import CommandError, call_command
from django.db import transaction
from django.test import Client
from django.utils import timezone
from playwright.sync_api import expect, sync_playwright

import protocol
from elections import actions, commands, heartbeats
from elections.models import Agent, AuditEntry, Command, Membership
from tests.helpers import hello, parsed_event
from tests.live import LiveDashboard, create_user, demo_fleet
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.django_db

NAME = "billing/cluster"


def beat(agent: str, state: str, leader: str | None = None, token: int | None = None) -> None:
    heartbeats.record_heartbeat(
        agent,
        protocol.Heartbeat(
            at=datetime.now(UTC),
            states={NAME: protocol.ElectionState(state=state, leader=leader, token=token)},
        ),
    )


@pytest.fixture
def fleet() -> None:
    """a leads (token 7); b follows it; c is offline; d observes; e follows an older leader;
    f has no_failover; g's agent no longer reports the election (a zombie)."""
    for agent in "abcdefg":
        actions.register_agent(hello(agent, NAME), session=f"s-{agent}")
    actions.ingest_events("a", [parsed_event(1, NAME, "leader", 7, leader="a")])
    beat("a", "leader", "a", 7)
    beat("b", "follower", "a", 7)
    actions.agent_disconnected("c", "s-c")
    beat("d", "observer", "a", 7)
    beat("e", "follower", "z", 3)
    beat("f", "follower", "a", 7)
    Membership.objects.filter(agent_id="f").update(no_failover=True)
    Agent.objects.filter(pk="g").update(connected_at=timezone.now() - timedelta(minutes=5))


@pytest.fixture
def operator() -> User:
    user = User.objects.create_user("oncall", password="x" * 12)
    user.groups.add(Group.objects.get(name="operators"))
    return User.objects.get(pk=user.pk)


def why(run: commands.DryRun) -> dict[str, str]:
    return {c.agent: "; ".join(c.reasons) or "ok" for c in run.candidates}


def test_a_dry_run_explains_every_member(operator: User, fleet: None) -> None:
    run = commands.dry_run(operator, commands.Request(election=NAME, reason=""))
    assert run.refused is None and run.kind == "step-down"
    reasons = why(run)
    assert reasons["a"] == "it is the leader"
    assert reasons["b"] == "ok"
    assert "offline" in reasons["c"]
    assert "observer" in reasons["d"]
    assert "follows z (token 3), not the current leader a (token 7)" in reasons["e"]
    assert "no_failover" in reasons["f"]
    assert "has not reported this election" in reasons["g"]
    named = commands.dry_run(
        operator, commands.Request(election=NAME, reason="", successor="nobody")
    )
    assert named.kind == "switchover" and "not a member" in why(named)["nobody"]
    assert named.refused is not None and named.refused.status == 412


def test_a_dry_run_writes_and_sends_nothing(
    operator: User, fleet: None, django_capture_on_commit_callbacks
) -> None:
    audit_before = AuditEntry.objects.count()
    with django_capture_on_commit_callbacks() as callbacks:
        commands.dry_run(operator, commands.Request(election=NAME, reason="x", successor="b"))
    assert callbacks == []  # no broadcast, no command frame
    assert not Command.objects.exists()
    assert AuditEntry.objects.count() == audit_before


def test_the_real_switchover_agrees_with_the_dry_run(operator: User, fleet: None) -> None:
    for successor in [*"abcdefg", "nobody"]:
        wanted = commands.Request(election=NAME, reason="agreement", successor=successor)
        predicted = commands.dry_run(operator, wanted)
        point = transaction.savepoint()
        try:
            commands.request_stepdown(operator, wanted)
            refusal = None
        except commands.Refused as refused:
            refusal = refused.message
        transaction.savepoint_rollback(point)
        assert refusal == (predicted.refused.message if predicted.refused else None), successor
        assert (refusal is None) == (successor == "b"), successor


def test_a_member_following_another_leader_cannot_take_over(operator: User, fleet: None) -> None:
    for member in ("e", "g"):
        with pytest.raises(commands.Refused) as info:
            commands.request_stepdown(
                operator, commands.Request(election=NAME, reason="x", successor=member)
            )
        assert info.value.status == 412 and f"{member} is not a healthy candidate" in str(
            info.value
        )
    assert "follows z" in str(info.value) or "has not reported" in str(info.value)


def test_no_healthy_candidate_is_refused_alike(operator: User, fleet: None) -> None:
    Membership.objects.filter(agent_id="b").update(no_failover=True)
    run = commands.dry_run(operator, commands.Request(election=NAME, reason=""))
    assert run.refused is not None and "no healthy candidate" in run.refused.message
    with pytest.raises(commands.Refused, match="no healthy candidate"):
        commands.request_stepdown(operator, commands.Request(election=NAME, reason="x"))


def test_the_api_dry_run(operator: User, fleet: None) -> None:
    client = Client()
    auth = {"HTTP_AUTHORIZATION": f"Bearer {actions.issue_api_token(operator)}"}
    url = f"/api/v1/elections/{NAME}/step-down?dry_run=1"
    ok = client.post(url, {"successor": "b"}, content_type="application/json", **auth)
    assert ok.status_code == 200, ok.content
    body = ok.json()
    assert (body["dry_run"], body["would"], body["kind"]) == (True, "send", "switchover")
    by_agent = {c["agent"]: c for c in body["candidates"]}
    assert by_agent["b"]["could_take_over"] and not by_agent["c"]["could_take_over"]
    assert any("offline" in r for r in by_agent["c"]["why_not"])
    no = client.post(url, {"successor": "e"}, content_type="application/json", **auth)
    assert no.status_code == 412 and no.json()["would"] == "refuse"
    assert not Command.objects.exists()
    nobody = User.objects.create_user("viewer", password="x" * 12)
    plain = {"HTTP_AUTHORIZATION": f"Bearer {actions.issue_api_token(nobody)}"}
    assert client.post(url, {}, content_type="application/json", **plain).status_code == 403


def test_the_dialog_dry_run(operator: User, fleet: None) -> None:
    client = Client()
    client.force_login(operator)
    url = f"/elections/{NAME}/step-down"
    assert 'name="dry_run" value="1"' in client.get(url).content.decode()
    page = client.post(url, {"dry_run": "1", "successor": "d"}).content.decode()
    assert 'data-testid="dry-run"' in page and "would be refused" in page
    row = page.split('data-candidate="d"')[1].split("</tr>")[0]
    assert "observer" in row and "<td>no</td>" in row
    assert not Command.objects.exists()


def test_ctl_switchover_dry_run(operator: User, fleet: None, capsys) -> None:
    args = ["ctl", "switchover", NAME, "--user", "oncall", "--dry-run"]
    call_command(*args, "--to", "b")
    out = capsys.readouterr().out
    assert "would be sent (nothing was sent)" in out and "offline" in out
    with pytest.raises(CommandError, match="would be refused"):
        call_command(*args, "--to", "c")
    assert not Command.objects.exists()


# -- end to end: real agents, a real browser ---------------------------------------------


@pytest.mark.browser
@pytest.mark.live
def test_the_dialog_s_dry_run_button_with_real_agents(
    embedded_dashboard: LiveDashboard, tmp_path: Path
) -> None:
    """Real raft agents report who they follow: the follower that may vote could take over,
    the no-vote member (web-3 in search/shard-2) could not; nothing is sent."""
    dashboard = embedded_dashboard
    create_user(dashboard, "sre", "correct-horse-battery")
    with demo_fleet(dashboard, tmp_path), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(dashboard.url + "/login/?next=/elections/search/shard-2/")
        page.get_by_label("Username").fill("sre")
        page.get_by_label("Password").fill("correct-horse-battery")
        page.get_by_role("button", name="Log in").click()
        # The leader and both followers' views arrive with the first heartbeats.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            page.reload()
            if page.get_by_role("button", name="Step down / switch over…").count():
                break
            time.sleep(0.5)
        leader = page.get_by_test_id("leader").inner_text()
        assert leader in ("web-1", "web-2")
        follower = {"web-1": "web-2", "web-2": "web-1"}[leader]
        time.sleep(4)  # one more heartbeat: every follower's view of the leader is stored
        page.get_by_role("button", name="Step down / switch over…").click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_role("button", name="Dry run").click()
        verdict = dialog.get_by_test_id("dry-run")
        expect(verdict).to_contain_text("would be sent. Nothing was sent.")
        expect(verdict.locator(f'tr[data-candidate="{leader}"]')).to_contain_text("the leader")
        expect(verdict.locator(f'tr[data-candidate="{follower}"] td').nth(2)).to_have_text("yes")
        expect(verdict.locator('tr[data-candidate="web-3"]')).to_contain_text("no-vote")
        browser.close()
    count = dashboard.manage(
        "shell", "-c", "from elections.models import Command; print(Command.objects.count())"
    )
    assert count.split()[-1] == "0"
