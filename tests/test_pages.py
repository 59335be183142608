"""Pages and the JSON API, through Django's test client."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

import protocol
from elections import actions
from elections.models import Command, Election, Term
from tests.helpers import event, hello

pytestmark = pytest.mark.django_db


@pytest.fixture
def fleet() -> None:
    for agent in ("a", "b"):
        actions.register_agent(
            protocol.Hello(
                agent=agent,
                elections=[
                    protocol.ElectionInfo(
                        name="billing/cluster", backend="etcd", ttl=5, labels={"cluster": "eu-1"}
                    ),
                    protocol.ElectionInfo(name="search/shard-1", backend="raft", ttl=1),
                ],
            )
        )
    event = protocol.Event.model_validate(
        {
            "seq": 1,
            "election": "billing/cluster",
            "from": "candidate",
            "to": "leader",
            "token": 42,
            "leader": "a",
            "at": datetime(2026, 11, 1, tzinfo=UTC),
        }
    )
    actions.ingest_events("a", [event])


def test_pages_and_api_need_a_login(client: Client, fleet: None) -> None:
    assert client.get("/").status_code == 302
    assert client.get("/elections/billing/cluster/").status_code == 302
    response = client.get("/api/v1/elections")
    assert response.status_code == 401
    assert response.json() == {"error": "authentication required"}


def test_api_lists_elections_in_the_documented_shape(sre: Client, fleet: None) -> None:
    data = sre.get("/api/v1/elections").json()
    [billing, search] = data["elections"]
    assert {k: billing[k] for k in ("name", "backend", "status", "leader", "token")} == {
        "name": "billing/cluster",
        "backend": "etcd",
        "status": "led",
        "leader": "a",
        "token": 42,
    }
    assert billing["since"] == "2026-11-01T00:00:00+00:00"
    assert [(m["agent"], m["state"]) for m in billing["members"]] == [
        ("a", "leader"),
        ("b", "follower"),
    ]
    assert (search["status"], search["leader"], search["token"]) == ("leaderless", None, None)


def test_api_election_names_may_contain_slashes(sre: Client, fleet: None) -> None:
    assert sre.get("/api/v1/elections/billing/cluster").json()["leader"] == "a"
    terms = sre.get("/api/v1/elections/billing/cluster/terms").json()["terms"]
    assert [(t["leader"], t["token"], t["ended"]) for t in terms] == [("a", 42, None)]
    assert sre.get("/api/v1/elections/no/such").status_code == 404
    agents = sre.get("/api/v1/agents").json()["agents"]
    assert [(a["id"], a["connected"]) for a in agents] == [("a", True), ("b", True)]


def test_leader_map_and_filters(sre: Client, fleet: None) -> None:
    page = sre.get("/").content.decode()
    assert "billing/cluster" in page and "search/shard-1" in page
    assert 'ws-connect="/ws/live/"' in page
    assert "/static/vendor/htmx-ext-ws/ws.js" in page
    only_raft = sre.get("/", {"backend": "raft"}).content.decode()
    assert "search/shard-1" in only_raft and "billing/cluster" not in only_raft
    assert 'ws-connect="/ws/live/?backend=raft"' in only_raft
    by_label = sre.get("/", {"label": "cluster=eu-1"}).content.decode()
    assert "billing/cluster" in by_label and "search/shard-1" not in by_label
    leaderless = sre.get("/", {"status": "leaderless"}).content.decode()
    assert "search/shard-1" in leaderless and "billing/cluster" not in leaderless


def test_election_page_shows_terms_and_transitions(sre: Client, fleet: None) -> None:
    page = sre.get("/elections/billing/cluster/").content.decode()
    assert "candidate → leader" in page
    assert ">42<" in page
    assert sre.get("/elections/no/such/").status_code == 404


def test_metrics_describe_the_fleet(sre: Client, client: Client, fleet: None) -> None:
    assert client.get("/metrics").status_code == 401
    text = sre.get("/metrics").content.decode()
    assert 'electorate_elections{backend="etcd",status="led"} 1.0' in text
    assert 'electorate_elections{backend="raft",status="leaderless"} 1.0' in text
    assert 'electorate_leaderless_seconds{election="search/shard-1"}' in text
    assert 'electorate_leader_changes_total{backend="etcd",election="billing/cluster"} 1.0' in text
    assert 'electorate_leader_changes_total{backend="raft",election="search/shard-1"} 0.0' in text
    assert 'electorate_agents{connected="true"} 2.0' in text
    assert "# TYPE electorate_transitions_ingested_total counter" in text


def test_the_elections_api_pages_with_a_cursor_and_reports_the_total(sre: Client) -> None:
    names = [f"svc/{i:03d}" for i in range(7)]
    actions.register_agent(
        protocol.Hello(
            agent="a",
            elections=[protocol.ElectionInfo(name=n, backend="raft", ttl=1) for n in names],
        )
    )
    first = sre.get("/api/v1/elections", {"limit": 3}).json()
    assert first["total"] == 7
    assert [e["name"] for e in first["elections"]] == names[:3]
    seen = [e["name"] for e in first["elections"]]
    following = first["next"]
    while following:
        page = sre.get(following).json()
        assert page["total"] == 7
        seen += [e["name"] for e in page["elections"]]
        following = page["next"]
    assert seen == names
    assert sre.get("/api/v1/elections", {"limit": 0}).status_code == 400
    filtered = sre.get("/api/v1/elections", {"q": "svc/00", "limit": 2}).json()
    assert filtered["total"] == 7 and len(filtered["elections"]) == 2


def _history(operator: Any, terms: int) -> None:
    """billing/cluster led by a, then b and a in turn ``terms`` times, with a gap before the
    last one, and a step-down by ``operator`` ending the first term."""
    now = datetime.now(UTC)
    start = now - timedelta(hours=2)
    actions.register_agent(hello("a", "billing/cluster"))
    actions.register_agent(hello("b", "billing/cluster"))
    seqs = {"a": 0, "b": 0}

    def report(agent: str, to: str, token: int, when: datetime, **extra: Any) -> None:
        seqs[agent] += 1
        item = event(seqs[agent], "billing/cluster", to=to, token=token, at=when, **extra)
        if to != "leader":
            item["from"] = "leader"
        actions.ingest_events(agent, [protocol.Event.model_validate(item)])

    report("a", "leader", 100, start, leader="a")
    Command.objects.create(
        election=Election.objects.get(name="billing/cluster"),
        kind="step-down",
        reason="kernel upgrade",
        requested_by=operator,
        status=Command.Status.DONE,
        old_token=100,
        created=start + timedelta(minutes=9),
        sent_at=start + timedelta(minutes=9),
    )
    report("a", "follower", 100, start + timedelta(minutes=10), reason="forced")
    step = timedelta(minutes=60) / terms
    when = start + timedelta(minutes=10, seconds=2)
    for i in range(terms):
        agent = "ab"[(i + 1) % 2]
        report(agent, "leader", 101 + i, when, leader=agent)
        if i < terms - 1:
            report(agent, "follower", 101 + i, when + step, reason="resigned")
            when += step
            if i == terms - 2:
                when += timedelta(minutes=5)  # five minutes without a leader


def test_the_election_page_draws_terms_gaps_and_who_stepped_the_leader_down(
    sre: Client, django_user_model: Any
) -> None:
    _history(django_user_model.objects.get(username="sre"), terms=3)
    page = sre.get("/elections/billing/cluster/").content.decode()
    assert 'ws-connect="/ws/live/?election=' in page
    chart = page[page.index('data-testid="timeline"') : page.index("</svg>")]
    segments = re.findall(r'<g class="seg (\w+)[^"]*"[^>]*data-leader="([^"]*)"', chart)
    assert segments == [
        ("unknown", ""),  # before its first term
        ("term", "a"),
        ("gap", ""),  # two seconds after the step-down
        ("term", "b"),
        ("term", "a"),  # a resign taken over at once: no gap
        ("gap", ""),  # the five minutes nobody led
        ("term", "b"),
    ]
    assert 'data-end-reason="forced" data-actor="sre"' in chart
    assert "ended: forced, step-down by sre" in chart
    assert re.search(r'<g class="marker status-done"[^>]*data-actor="sre">', chart)
    assert "no leader from" in chart


def test_the_election_page_costs_the_same_queries_for_any_history(
    sre: Client, django_user_model: Any
) -> None:
    operator = django_user_model.objects.get(username="sre")

    def cost() -> int:
        with CaptureQueriesContext(connection) as queries:
            assert sre.get("/elections/billing/cluster/").status_code == 200
        return len(queries.captured_queries)

    _history(operator, terms=2)
    few = cost()
    for i in range(30):
        actions.register_agent(hello(f"m{i}", "billing/cluster"))
    Term.objects.all().delete()
    Command.objects.all().delete()
    _history(operator, terms=40)
    election = Election.objects.get(name="billing/cluster")
    for i in range(15):  # each drawn with its actor on the timeline and listed
        Command.objects.create(
            election=election,
            kind="step-down",
            reason=f"drill {i}",
            requested_by=operator,
            status=Command.Status.EXPIRED,
            old_token=101 + i,
            created=datetime.now(UTC) - timedelta(minutes=50 - i),
        )
    assert cost() == few
