"""/metrics, parsed as Prometheus does: every family typed right, the values the fleet holds,
and a scrape of 5,000 elections costing what a scrape of three does."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from elections import actions, meters
from elections.ingest import Frame
from elections.ingest_queue import IngestQueue
from elections.models import Agent, Command, Election, Term
from tests.helpers import hello, parsed_event

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def quiet_meter() -> None:
    meters.meter.take()  # counts another test left in this process's meter


def scrape(client: Client) -> dict[str, Metric]:
    response = client.get("/metrics")
    assert response.status_code == 200
    return {m.name: m for m in text_string_to_metric_families(response.content.decode())}


def sample(family: Metric, suffix: str = "", **labels: str) -> float | None:
    for s in family.samples:
        if s.name == family.name + suffix and s.labels == labels:
            return s.value
    return None


def hand_over(election: str, gaps: list[float]) -> None:
    """a and b take turns; each leader resigns and the other wins ``gap`` seconds later."""
    actions.register_agent(hello("a", election))
    actions.register_agent(hello("b", election))
    at = datetime.now(UTC) - timedelta(minutes=2)
    seq = {"a": 1, "b": 0}
    actions.ingest_events("a", [parsed_event(1, election, "leader", 1, at=at)])
    for token, gap in enumerate(gaps, start=2):
        old, new = ("a", "b") if token % 2 == 0 else ("b", "a")
        at += timedelta(seconds=1)
        seq[old] += 1
        left = parsed_event(
            seq[old], election, "follower", token - 1, from_="leader", at=at, reason="resigned"
        )
        actions.ingest_events(old, [left])
        at += timedelta(seconds=gap)
        seq[new] += 1
        actions.ingest_events(new, [parsed_event(seq[new], election, "leader", token, at=at)])


def test_every_family_is_typed_and_counts_what_the_fleet_holds(sre: Client) -> None:
    hand_over("e/1", [0.3, 2.0, 45.0])  # four terms within two minutes: flapping
    actions.register_agent(hello("c", "e/2"))  # leaderless, never led
    e1 = Election.objects.get(name="e/1")
    assert e1.flapping_since is not None
    for status in ("done", "failed", "pending"):
        Command.objects.create(election=e1, kind="step-down", reason="test", status=status)
    meters.meter.ingested(frames=2, events=5, stored=4)
    meters.meter.lags([0.003, 0.2])

    m = scrape(sre)
    types = {name: family.type for name, family in m.items() if name.startswith("electorate_")}
    assert types == {
        "electorate_elections": "gauge",
        "electorate_leaderless_seconds": "gauge",
        "electorate_flapping": "gauge",
        "electorate_leader_changes": "counter",
        "electorate_failover_gap_seconds": "histogram",
        "electorate_agents": "gauge",
        "electorate_commands": "counter",
        "electorate_commands_open": "gauge",
        "electorate_ingest_frames": "counter",
        "electorate_ingest_events": "counter",
        "electorate_transitions_ingested": "counter",
        "electorate_ingest_lag_seconds": "histogram",
    }
    changes = m["electorate_leader_changes"]
    assert sample(changes, "_total", election="e/1", backend="raft") == 4
    assert sample(changes, "_total", election="e/2", backend="raft") == 0

    gap = m["electorate_failover_gap_seconds"]
    buckets = {s.labels["le"]: s.value for s in gap.samples if s.name.endswith("_bucket")}
    assert buckets == {
        "0.1": 0,
        "0.25": 0,
        "0.5": 1,
        "1.0": 1,
        "2.5": 2,
        "5.0": 2,
        "10.0": 2,
        "15.0": 2,
        "30.0": 2,
        "60.0": 3,
        "+Inf": 3,
    }
    assert {s.labels["backend"] for s in gap.samples} == {"raft"}  # no election label
    assert sample(gap, "_count", backend="raft") == 3
    assert sample(gap, "_sum", backend="raft") == pytest.approx(47.3)

    assert sample(m["electorate_flapping"], election="e/1") == 1
    assert sample(m["electorate_flapping"], election="e/2") is None
    assert sample(m["electorate_leaderless_seconds"], election="e/2") > 0
    assert sample(m["electorate_leaderless_seconds"], election="e/1") is None
    assert sample(m["electorate_agents"], connected="true") == 3
    commands = m["electorate_commands"]
    assert sample(commands, "_total", kind="step-down", outcome="done") == 1
    assert sample(commands, "_total", kind="step-down", outcome="failed") == 1
    assert sample(commands, "_total", kind="step-down", outcome="pending") is None
    assert sample(m["electorate_commands_open"], kind="step-down", status="pending") == 1

    assert sample(m["electorate_ingest_frames"], "_total") == 2
    assert sample(m["electorate_ingest_events"], "_total") == 5
    assert sample(m["electorate_transitions_ingested"], "_total") == 4
    lag = m["electorate_ingest_lag_seconds"]
    assert sample(lag, "_bucket", le="0.005") == 1
    assert sample(lag, "_bucket", le="0.25") == 2
    assert sample(lag, "_count") == 2
    assert sample(lag, "_sum") == pytest.approx(0.203)

    # Counters are stored, not kept in one process: the next scrape (any process) goes on
    # from there, and a later count adds to it.
    meters.meter.ingested(frames=1, events=1, stored=0)
    again = scrape(sre)
    assert sample(again["electorate_ingest_frames"], "_total") == 3
    assert sample(again["electorate_transitions_ingested"], "_total") == 4


def test_a_scrape_of_5000_elections_costs_what_a_scrape_of_three_does(sre: Client) -> None:
    hand_over("e/1", [0.3, 2.0, 45.0])
    Command.objects.create(
        election=Election.objects.get(), kind="step-down", reason="x", status="done"
    )

    def cost() -> tuple[int, int]:
        with CaptureQueriesContext(connection) as queries:
            text = sre.get("/metrics").content.decode()
        return len(queries.captured_queries), len(text.splitlines())

    meters.meter.ingested(frames=1, events=1, stored=1)  # both scrapes write a second's counts
    small, small_lines = cost()
    agent = Agent.objects.get(pk="a")
    now = datetime.now(UTC)
    Election.objects.bulk_create(
        Election(
            name=f"fleet/{i:04d}",
            backend=("raft", "etcd", "nats")[i % 3],
            status="leaderless" if i % 10 == 0 else "led",
            leaderless_since=now if i % 10 == 0 else None,
            flapping_since=now if i % 50 == 0 else None,
        )
        for i in range(5000)
    )
    Term.objects.bulk_create(
        Term(election=e, leader=agent, token=1, started=now, gap=(e.pk % 70) / 7)
        for e in Election.objects.filter(name__startswith="fleet/")
    )
    meters.meter.ingested(frames=1, events=1, stored=1)
    started = time.perf_counter()
    big, big_lines = cost()
    elapsed = time.perf_counter() - started
    assert big == small, "a scrape must not cost a query per election"
    # Bounded: a line per election for leader changes, one per leaderless or flapping one;
    # the histograms do not grow with the fleet (three backends).
    assert big_lines - small_lines < 5000 + 500 + 100 + 3 * 13 + 40
    assert elapsed < 5, f"scrape of 5,000 elections took {elapsed:.2f}s"


@pytest.mark.django_db(transaction=True)
async def test_the_ingest_queue_counts_frames_events_and_their_lag() -> None:
    await sync_to_async(actions.register_agent)(hello("a", "e/1"))
    queue = IngestQueue()
    try:
        result = await queue.submit(Frame("a", [parsed_event(1, "e/1", "leader", 1)]))
        replay = await queue.submit(Frame("a", [parsed_event(1, "e/1", "leader", 1)]))
    finally:
        await queue.stop()
        await meters.flusher().stop()
        meters.flusher.forget()
    assert (result.stored, replay.stored) == (1, 0)
    totals = await sync_to_async(meters.totals)()
    # This thread's connection would keep the test database from being dropped.
    await sync_to_async(lambda: connection.close())()
    assert totals[meters.FRAMES] == 2
    assert totals[meters.EVENTS] == 2
    assert totals[meters.STORED] == 1
    assert totals[meters.LAG_COUNT] == 2
    assert 0 < totals[meters.LAG_SUM] < 5
    assert totals["ingest_lag_le:10.0"] == 2
