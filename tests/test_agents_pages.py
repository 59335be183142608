"""Zombie memberships, orphan elections, the agents pages and forgetting them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth.models import Group, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

import protocol
from elections import actions, heartbeats, liveness
from elections.models import Agent, AuditEntry, Election, Membership
from tests.helpers import hello

pytestmark = pytest.mark.django_db

LONG_AGO = timedelta(minutes=5)  # beyond the zombie grace (ELECTORATE_AGENT_STALE_AFTER, 15 s)


def beat(*names: str) -> protocol.Heartbeat:
    """A heartbeat listing ``names`` as followed elections."""
    return protocol.Heartbeat(
        at=datetime.now(UTC),
        states={n: protocol.ElectionState(state="follower") for n in names},
    )


def connected_long_ago(agent: str) -> None:
    """The agent has been connected for a while: past the grace after its hello."""
    Agent.objects.filter(pk=agent).update(connected_at=timezone.now() - LONG_AGO)


def zombies(agent: str) -> list[str]:
    """Election names flagged zombie on the agent's page (read from the HTML)."""
    return [
        m.election.name
        for m in Membership.objects.filter(agent_id=agent).select_related("election")
        if f'data-membership="{m.election.name}"' in PAGE[agent]
        and "zombie: no longer reported"
        in PAGE[agent].split(f'data-membership="{m.election.name}"')[1].split("</tr>")[0]
    ]


PAGE: dict[str, str] = {}


def agent_page(client: Client, agent: str) -> str:
    response = client.get(f"/agents/{agent}/")
    assert response.status_code == 200
    PAGE[agent] = response.content.decode()
    return PAGE[agent]


@pytest.fixture
def sre() -> Client:
    client = Client(enforce_csrf_checks=True)
    client.force_login(User.objects.create_user("sre", password="x" * 12))
    return client


@pytest.fixture
def operator() -> Client:
    user = User.objects.create_user("oncall", password="x" * 12)
    user.groups.add(Group.objects.get(name="operators"))
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    return client


def post_confirmed(client: Client, url: str) -> int:
    """Open the confirmation page, then post its form with its CSRF token."""
    page = client.get(url)
    if page.status_code != 200:
        return page.status_code
    token = page.content.decode().split('name="csrfmiddlewaretoken" value="')[1].split('"')[0]
    return client.post(url, {"csrfmiddlewaretoken": token}).status_code


# -- zombies ------------------------------------------------------------------------------


def test_a_connected_agent_that_stops_reporting_an_election_leaves_a_zombie(sre: Client) -> None:
    actions.register_agent(hello("a", "e/1", "e/2"), session="s1")
    connected_long_ago("a")
    heartbeats.record_heartbeat("a", beat("e/1"))  # its config dropped e/2
    agent_page(sre, "a")
    assert zombies("a") == ["e/2"]
    listing = sre.get("/agents/").content.decode()
    assert 'data-testid="zombies">1 zombie<' in listing


def test_renewals_through_the_liveness_flush_keep_a_membership_alive(sre: Client) -> None:
    session = actions.register_agent(hello("a", "e/1", "e/2"), session="s1")
    changed, _ = heartbeats.rows(session.members, beat("e/1", "e/2"), timezone.now())
    heartbeats.write_views("a", changed)
    # Minutes later: both were last written long ago; now only e/1 is still reported, and
    # its heartbeats change nothing (the consumer's path: the buffer, then one flush).
    connected_long_ago("a")
    Membership.objects.update(reported=timezone.now() - LONG_AGO)
    members = heartbeats.members_of("a")
    changed, renewed = heartbeats.rows(members, beat("e/1"), timezone.now())
    assert changed == [] and len(renewed) == 1
    buffer = liveness.Liveness()
    buffer.seen("a", "s1", timezone.now())
    for row in renewed:
        buffer.lease(row.member_id, row.election_id, row.lease_expires, row.claims)
    liveness.flush(buffer.take())
    agent_page(sre, "a")
    assert zombies("a") == ["e/2"]


def test_no_zombie_right_after_a_hello_nor_for_an_offline_agent(sre: Client) -> None:
    actions.register_agent(hello("new", "e/1"), session="s1")  # no heartbeat yet: in grace
    actions.register_agent(hello("gone", "e/1"), session="s2")
    connected_long_ago("gone")
    actions.agent_disconnected("gone", "s2")
    for agent in ("new", "gone"):
        agent_page(sre, agent)
        assert zombies(agent) == []


# -- orphans -------------------------------------------------------------------------------


def test_elections_nobody_reported_for_a_day_are_orphans(sre: Client) -> None:
    actions.register_agent(hello("a", "old/1", "live/1", "never/1"), session="s1")
    heartbeats.record_heartbeat("a", beat("old/1", "live/1"))
    two_days = timezone.now() - timedelta(days=2)
    Membership.objects.filter(election__name="old/1").update(reported=two_days)
    Election.objects.filter(name="never/1").update(updated=two_days)
    page = sre.get("/agents/").content.decode()
    orphans = page.split('id="orphans"')[1]
    assert "Orphan elections (2)" in page
    assert 'data-orphan="old/1"' in orphans and 'data-orphan="never/1"' in orphans
    assert 'data-orphan="live/1"' not in orphans


# -- the pages -----------------------------------------------------------------------------


def test_the_agents_page_lists_every_agent_and_is_linked_from_the_nav(sre: Client) -> None:
    actions.register_agent(
        protocol.Hello(agent="web-1", hostname="host-1", version="1.2.3", elections=[])
    )
    page = sre.get("/").content.decode()
    assert 'href="/agents/"' in page
    listing = sre.get("/agents/").content.decode()
    row = listing.split('data-agent="web-1"')[1].split("</tr>")[0]
    assert "1.2.3" in row and "host-1" in row and "yes" in row


def test_pages_cost_the_same_queries_for_a_few_agents_as_for_many(sre: Client) -> None:
    def cost(url: str) -> int:
        with CaptureQueriesContext(connection) as queries:
            assert sre.get(url).status_code == 200
        return len(queries.captured_queries)

    actions.register_agent(hello("a0", "e/0"))
    few, one = cost("/agents/"), cost("/agents/a0/")
    for i in range(1, 150):
        actions.register_agent(hello(f"a{i}", "e/0", f"e/{i}"))
    actions.register_agent(hello("a0", *(f"e/{i}" for i in range(60))))
    Election.objects.update(updated=timezone.now() - timedelta(days=2))  # all orphans
    assert cost("/agents/") == few
    assert cost("/agents/?page=2") == few
    assert cost("/agents/a0/") == one


# -- forgetting ----------------------------------------------------------------------------


def test_forgetting_needs_the_permission(sre: Client) -> None:
    actions.register_agent(hello("a", "e/1"), session="s1")
    actions.agent_disconnected("a", "s1")
    member = Membership.objects.get()
    for url in ("/agents/a/forget", f"/memberships/{member.pk}/forget", "/elections/e/1/forget"):
        assert sre.get(url).status_code == 403
        token = sre.get("/agents/").cookies  # any page: the CSRF cookie
        assert sre.post(url, {"csrfmiddlewaretoken": token}).status_code == 403
    assert Agent.objects.get().forgotten is None and Membership.objects.exists()


def test_a_forget_without_its_csrf_token_is_refused(operator: Client) -> None:
    actions.register_agent(hello("a", "e/1"), session="s1")
    actions.agent_disconnected("a", "s1")
    assert operator.post("/agents/a/forget").status_code == 403
    assert Agent.objects.get().forgotten is None


def test_an_operator_forgets_a_zombie_membership_but_not_a_live_one(operator: Client) -> None:
    actions.register_agent(hello("a", "e/1", "e/2"), session="s1")
    connected_long_ago("a")
    heartbeats.record_heartbeat("a", beat("e/1"))
    live, zombie = (Membership.objects.get(election__name=n).pk for n in ("e/1", "e/2"))
    assert post_confirmed(operator, f"/memberships/{live}/forget") == 409
    assert post_confirmed(operator, f"/memberships/{zombie}/forget") == 302
    assert list(Membership.objects.values_list("election__name", flat=True)) == ["e/1"]
    entry = AuditEntry.objects.get(action=AuditEntry.Action.MEMBERSHIP_FORGOTTEN)
    assert (entry.actor, entry.target, entry.detail["agent"]) == ("oncall", "e/2", "a")


def test_an_operator_forgets_an_orphan_election_but_not_a_reported_one(operator: Client) -> None:
    actions.register_agent(hello("a", "old/1", "live/1"), session="s1")
    heartbeats.record_heartbeat("a", beat("old/1", "live/1"))
    Membership.objects.filter(election__name="old/1").update(
        reported=timezone.now() - timedelta(days=2)
    )
    assert post_confirmed(operator, "/elections/live/1/forget") == 409
    assert post_confirmed(operator, "/elections/old/1/forget") == 302
    assert list(Election.objects.values_list("name", flat=True)) == ["live/1"]
    entry = AuditEntry.objects.get(action=AuditEntry.Action.ELECTION_FORGOTTEN)
    assert (entry.actor, entry.target) == ("oncall", "old/1")


def test_an_operator_forgets_an_offline_agent_which_a_hello_brings_back(operator: Client) -> None:
    actions.register_agent(hello("on", "e/1"), session="s1")
    actions.register_agent(hello("off", "e/1"), session="s2")
    actions.agent_disconnected("off", "s2")
    assert post_confirmed(operator, "/agents/on/forget") == 409
    assert post_confirmed(operator, "/agents/off/forget") == 302
    assert 'data-agent="off"' not in operator.get("/agents/").content.decode()
    assert operator.get("/agents/off/").status_code == 404
    assert [a["id"] for a in operator.get("/api/v1/agents").json()["agents"]] == ["on"]
    assert list(Membership.objects.values_list("agent_id", flat=True)) == ["on"]
    entry = AuditEntry.objects.get(action=AuditEntry.Action.AGENT_FORGOTTEN)
    assert (entry.actor, entry.target, entry.detail["memberships"]) == ("oncall", "off", 1)
    actions.register_agent(hello("off", "e/1"), session="s3")
    assert 'data-agent="off"' in operator.get("/agents/").content.decode()


def test_clock_skew_is_shown_and_flagged_past_the_warning(sre: Client) -> None:
    for agent, skew in (("calm", 0.2), ("drifting", -4.0), ("new", None)):
        actions.register_agent(hello(agent))
        Agent.objects.filter(pk=agent).update(clock_skew=skew)
    listing = sre.get("/agents/").content.decode()

    def cell(agent: str) -> str:
        return listing.split(f'data-agent="{agent}"')[1].split("</tr>")[0]

    assert "+0.200 s" in cell("calm") and 'data-testid="skewed"' not in cell("calm")
    assert "-4.000 s" in cell("drifting") and 'data-testid="skewed"' in cell("drifting")
    assert "—" in cell("new")
    assert 'data-testid="skewed"' in agent_page(sre, "drifting")
    assert 'data-testid="skewed"' not in agent_page(sre, "calm")
