"""Ingest and hellos are set-based: their statement count does not grow with their size."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

import protocol
from elections import actions
from elections.ingest import Frame, ingest_frames
from elections.models import Agent, Election, Membership, Term, Transition
from tests.helpers import hello, parsed_event
from tests.ingest_checks import T0, assert_superseded

pytestmark = pytest.mark.django_db


def won(seq: int, election: str, token: int, at: int = 0) -> protocol.Event:
    return parsed_event(seq, election, "leader", token, at=T0 + timedelta(seconds=at))


def statements(call) -> int:
    with CaptureQueriesContext(connection) as queries:
        call()
    return len(queries.captured_queries)


def test_a_hello_costs_the_same_for_one_election_or_a_hundred() -> None:
    one = statements(lambda: actions.register_agent(hello("a", *["e/0"])))
    many = statements(lambda: actions.register_agent(hello("b", *[f"e/{i}" for i in range(100)])))
    assert many == one
    again = statements(lambda: actions.register_agent(hello("b", *[f"e/{i}" for i in range(100)])))
    assert again <= one
    assert Membership.objects.filter(agent_id="b").count() == 100


def test_a_frame_costs_the_same_for_one_event_or_a_hundred() -> None:
    names = [f"e/{i}" for i in range(100)]
    actions.register_agent(hello("a", *names))
    actions.register_agent(hello("b", *names))
    actions.ingest_events("a", [won(1, "e/0", 1), won(2, "e/1", 1)])

    one = statements(lambda: actions.ingest_events("b", [won(1, "e/0", 2)]))  # ends a's term
    many = statements(
        lambda: actions.ingest_events("b", [won(i + 2, n, 3) for i, n in enumerate(names)])
    )
    assert many == one, "a frame must not cost a statement per event or per election"
    assert Term.objects.filter(leader_id="b", token=3).count() == 100
    assert set(Election.objects.values_list("leader_id", flat=True)) == {"b"}
    # The terms b superseded ended, with the time of b's win.
    assert Term.objects.get(leader_id="a", election__name="e/1").end_reason == "superseded"


def test_a_replayed_frame_costs_little_and_changes_nothing() -> None:
    actions.register_agent(hello("a", *["e/0"]))
    frame = [won(1, "e/0", 1), won(2, "e/0", 2, at=1)]
    actions.ingest_events("a", frame)
    before = list(Transition.objects.values_list("pk", flat=True))
    cost = statements(lambda: actions.ingest_events("a", frame))
    # Lock the agent, look up elections and their members, try the insert, write the ack.
    assert cost <= 7
    assert list(Transition.objects.values_list("pk", flat=True)) == before


def test_frames_of_many_agents_share_one_transaction_and_keep_their_order() -> None:
    actions.register_agent(hello("a", *["e/0"]))
    actions.register_agent(hello("b", *["e/0"]))
    results = ingest_frames(
        [
            Frame("a", [won(1, "e/0", 5)]),
            Frame("b", [won(1, "e/0", 6, at=1)]),
            Frame("a", [won(1, "e/0", 5)]),  # the same frame again (a resend): stores nothing
        ]
    )
    assert [(r.acked, r.stored) for r in results] == [(1, 1), (1, 1), (1, 0)]
    election = Election.objects.get()
    assert (election.leader_id, election.token) == ("b", 6)
    assert Term.objects.get(token=5).end_reason == "superseded"


def test_an_older_token_later_in_a_batch_never_takes_the_seat() -> None:
    actions.register_agent(hello("a", *["e/0"]))
    actions.register_agent(hello("b", *["e/0"]))
    ingest_frames([Frame("b", [won(1, "e/0", 9, at=5)]), Frame("a", [won(1, "e/0", 4)])])
    assert_superseded("b", 9, "a", 4, at=5)


def test_a_gap_is_found_again_after_a_restart_of_the_dashboard() -> None:
    actions.register_agent(hello("a", *["e/0"]))
    assert actions.ingest_events("a", [won(1, "e/0", 1), won(3, "e/0", 3)]).acked == 1
    assert Agent.objects.get(pk="a").max_seq == 3
    assert actions.ingest_events("a", [won(2, "e/0", 2)]).acked == 3
    agent = Agent.objects.get(pk="a")
    assert (agent.last_seq, agent.max_seq) == (3, 3)


def test_a_late_close_of_an_old_session_does_not_mark_the_agent_offline() -> None:
    actions.register_agent(hello("a", *["e/0"]), session="old")
    actions.register_agent(hello("a", *["e/0"]), session="new")  # reconnected elsewhere
    actions.agent_disconnected("a", "old")
    assert Agent.objects.get(pk="a").connected
    actions.agent_disconnected("a", "new")
    agent = Agent.objects.get(pk="a")
    assert (agent.connected, agent.session) == (False, "")


def test_measuring_failover_gaps_from_leases_costs_no_statement_per_election() -> None:
    names = [f"e/{i}" for i in range(100)]
    actions.register_agent(hello("a", *names))
    actions.register_agent(hello("b", *names))
    actions.ingest_events("a", [won(i + 1, n, 1) for i, n in enumerate(names)])
    leading = protocol.ElectionState(state="leader", leader="a", token=1, ttl_left=5)
    actions.record_heartbeat("a", protocol.Heartbeat(at=T0, states=dict.fromkeys(names, leading)))

    one = statements(lambda: actions.ingest_events("b", [won(1, "e/0", 2, at=3600)]))
    many = statements(
        lambda: actions.ingest_events("b", [won(i + 2, n, 2, at=3600) for i, n in enumerate(names)])
    )
    assert many == one
    assert Term.objects.filter(token=2, gap__isnull=False).count() == 100
