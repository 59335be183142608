"""Failover gaps: measured on every leader change, from the old leader's last proven lease (or
its own report of leaving) to the new leader's win; statistics per election."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pytest
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

import protocol
from elections import actions, gaps
from elections.ingest import Frame, ingest_frames
from elections.models import AuditEntry, Election, Membership, Term
from tests.helpers import hello, parsed_event
from tests.test_exports import body
from tests.test_ingest import T0, ev

pytestmark = pytest.mark.django_db


@pytest.fixture
def pair() -> None:
    actions.register_agent(hello("a", "e/1"))
    actions.register_agent(hello("b", "e/1"))


def gap_of(token: int) -> float | None:
    return Term.objects.get(token=token).gap


def lease(agent: str, token: int, ttl_left: float) -> datetime:
    """A heartbeat in which ``agent`` holds the seat; returns the lease expiry stored."""
    state = protocol.ElectionState(state="leader", leader=agent, token=token, ttl_left=ttl_left)
    actions.record_heartbeat(agent, protocol.Heartbeat(at=T0, states={"e/1": state}))
    expires = Membership.objects.get(agent_id=agent).lease_expires
    assert expires is not None
    return expires


def test_a_resign_is_the_last_proven_lease(pair: None) -> None:
    actions.ingest_events("a", [ev(1, "leader", 1)])
    actions.ingest_events("a", [ev(2, "follower", 1, frm="leader", at=10, reason="resigned")])
    actions.ingest_events("b", [ev(1, "leader", 2, at=12.5)])
    assert gap_of(1) is None  # the election's first term: nothing before it
    assert gap_of(2) == pytest.approx(2.5)
    entry = AuditEntry.objects.filter(action="leader-changed").last()
    assert entry.detail["gap"] == pytest.approx(2.5)


def test_an_expired_or_lost_lease_reported_by_its_leader_counts_from_that_report(
    pair: None,
) -> None:
    actions.ingest_events(
        "a", [ev(1, "leader", 1), ev(2, "follower", 1, frm="leader", at=3, reason="lost")]
    )
    actions.ingest_events("b", [ev(1, "leader", 2, at=3.25)])
    assert gap_of(2) == pytest.approx(0.25)


def test_a_silent_leader_is_measured_from_its_last_known_lease(pair: None) -> None:
    """Killed with kill -9: the old leader never reports; its last heartbeat's lease counts."""
    actions.ingest_events("a", [ev(1, "leader", 1)])
    expires = lease("a", 1, ttl_left=5)
    actions.ingest_events(
        "b", [parsed_event(1, "e/1", "leader", 2, at=expires + timedelta(seconds=1.5))]
    )
    assert gap_of(2) == pytest.approx(1.5)
    assert Term.objects.get(token=1).end_reason in ("superseded", "agent-offline")


def test_a_win_inside_the_old_lease_is_a_gap_of_zero(pair: None) -> None:
    actions.ingest_events("a", [ev(1, "leader", 1)])
    expires = lease("a", 1, ttl_left=30)
    actions.ingest_events(
        "b", [parsed_event(1, "e/1", "leader", 2, at=expires - timedelta(seconds=10))]
    )
    assert gap_of(2) == 0.0


def test_without_a_resign_or_a_lease_the_gap_is_unknown(pair: None) -> None:
    actions.ingest_events("a", [ev(1, "leader", 1)])
    actions.ingest_events("b", [ev(1, "leader", 2, at=20)])
    assert gap_of(2) is None


def test_a_resign_arriving_after_the_new_win_replaces_the_lease_measure(pair: None) -> None:
    actions.ingest_events("a", [ev(1, "leader", 1)])
    expires = lease("a", 1, ttl_left=5)
    won = expires + timedelta(seconds=4)
    actions.ingest_events("b", [parsed_event(1, "e/1", "leader", 2, at=won)])
    assert gap_of(2) == pytest.approx(4)
    # a's own report of leaving, 0.75 s before b won, was only late on the wire.
    left = won - timedelta(seconds=0.75)
    actions.ingest_events(
        "a",
        [parsed_event(2, "e/1", "follower", 1, from_="leader", at=left, reason="resigned")],
    )
    assert gap_of(2) == pytest.approx(0.75)


def test_a_report_later_in_the_same_batch_than_the_win_counts_too(pair: None) -> None:
    actions.ingest_events("a", [ev(1, "leader", 1)])
    expires = lease("a", 1, ttl_left=5)
    won = expires + timedelta(seconds=4)
    left = won - timedelta(seconds=0.5)
    ingest_frames(
        [
            Frame("b", [parsed_event(1, "e/1", "leader", 2, at=won)]),
            Frame(
                "a",
                [parsed_event(2, "e/1", "follower", 1, from_="leader", at=left, reason="forced")],
            ),
        ]
    )
    assert gap_of(2) == pytest.approx(0.5)


def test_stats_over_the_window_against_ttl_and_rto(pair: None) -> None:
    now = datetime.now(UTC)
    gaps_seen = [0.5, 8.0, 1.0, 2.0]
    # An old change outside the window, then four changes with known gaps.
    seq = {"a": 0, "b": 0}
    start = now - timedelta(days=3)
    token = 1
    t = start

    def step(agent: str, kind: str, at: datetime, tok: int, **kw: object) -> None:
        seq[agent] += 1
        frm = "leader" if kind == "follower" else "candidate"
        event = parsed_event(seq[agent], "e/1", kind, tok, from_=frm, at=at, **kw)
        actions.ingest_events(agent, [event])

    step("a", "leader", t, token)
    step("a", "follower", t + timedelta(seconds=5), token, reason="resigned")
    step("b", "leader", t + timedelta(seconds=65), token + 1)  # gap 60 s, days ago
    token += 1
    t = now - timedelta(hours=1)
    leader = "b"
    for value in gaps_seen:
        other = "a" if leader == "b" else "b"
        step(leader, "follower", t, token, reason="resigned")
        t += timedelta(seconds=value)
        token += 1
        step(other, "leader", t, token)
        leader = other
        t += timedelta(minutes=5)
    election = Election.objects.get()
    election.ttl, election.labels = 5.0, {"rto": "1.5s"}
    election.save()

    with CaptureQueriesContext(connection) as one:
        stats = gaps.stats(election, now)
    assert len(one.captured_queries) == 1
    assert stats.changes == 4 and stats.unknown == 0
    assert stats.last == 2.0 and stats.worst == 8.0
    assert (stats.p50, stats.p99) == (1.0, 8.0)  # nearest rank
    assert (stats.ttl, stats.over_ttl) == (5.0, 1)
    assert (stats.rto, stats.rto_source, stats.over_rto) == (1.5, "label", 2)
    # Over a window reaching back four days, the old 60 s gap is the worst.
    assert gaps.stats_for([election], now, window=4 * 86400)[election.pk].worst == 60.0


def test_stats_cost_one_query_for_any_number_of_elections() -> None:
    names = [f"e/{i}" for i in range(50)]
    actions.register_agent(hello("a", *names))
    elections = list(Election.objects.all())
    with CaptureQueriesContext(connection) as queries:
        found = gaps.stats_for(elections)
    assert len(queries.captured_queries) == 1
    assert len(found) == 50 and all(s.changes == 0 and s.last is None for s in found.values())


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 30.0), ("2.5s", 2.5), ("500ms", 0.5), ("2m", 120.0), ("soon", None), ("0", None)],
)
def test_an_rto_label_reads_as_a_duration(text: str, seconds: float | None) -> None:
    assert gaps.parse_rto(text) == seconds


def test_the_rto_setting_applies_without_a_label(settings, pair: None) -> None:
    election = Election.objects.get()
    assert gaps.rto_of(election) == (None, "")
    settings.ELECTORATE_RTO = 4.0
    assert gaps.rto_of(election) == (4.0, "setting")
    election.labels = {"rto": "2"}
    assert gaps.rto_of(election) == (2.0, "label")


def test_gaps_show_in_the_api_the_export_and_the_page(sre: Client, pair: None) -> None:
    now = datetime.now(UTC)
    actions.ingest_events("a", [parsed_event(1, "e/1", "leader", 1, at=now - timedelta(minutes=9))])
    actions.ingest_events(
        "a",
        [
            parsed_event(
                2,
                "e/1",
                "follower",
                1,
                from_="leader",
                at=now - timedelta(minutes=8),
                reason="resigned",
            )
        ],
    )
    won = now - timedelta(minutes=8) + timedelta(seconds=3.25)
    actions.ingest_events("b", [parsed_event(1, "e/1", "leader", 2, at=won)])

    terms = sre.get("/api/v1/elections/e/1/terms").json()["terms"]
    assert [(t["token"], t["gap"]) for t in terms] == [(2, 3.25), (1, None)]
    detail = sre.get("/api/v1/elections/e/1").json()
    assert detail["failover_gaps"]["last"] == 3.25
    assert detail["failover_gaps"]["changes"] == 2
    assert detail["failover_gaps"]["ttl"] == 1.0

    csv = body(sre.get("/terms/export.csv", {"election": "e/1"})).splitlines()
    assert csv[0].split(",")[-1] == "gap"
    assert csv[2].endswith(",3.25") and csv[1].endswith(",")
    ndjson = body(sre.get("/terms/export.ndjson", {"election": "e/1"})).splitlines()
    assert '"gap": 3.25' in ndjson[1]

    page = sre.get("/elections/e/1/").content.decode()
    assert 'data-testid="failover-gaps"' in page
    assert "3.25 s" in page


def test_ctl_history_shows_the_gap_before_each_term(pair: None) -> None:
    actions.ingest_events("a", [ev(1, "leader", 1)])
    actions.ingest_events("a", [ev(2, "follower", 1, frm="leader", at=10, reason="resigned")])
    actions.ingest_events("b", [ev(1, "leader", 2, at=11.5)])
    out = io.StringIO()
    call_command("ctl", "history", "e/1", stdout=out)
    newest, first = out.getvalue().splitlines()
    assert "gap 1.500s" in newest and "current" in newest
    assert "gap ?" in first and "resigned" in first
