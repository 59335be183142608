"""Ingest: idempotent on (agent, seq), terms opened and closed, tokens only grow."""

from __future__ import annotations

from datetime import timedelta

import pytest

import protocol
from elections import actions, terms
from elections.models import Agent, AuditEntry, Election, Membership, Term, Transition
from tests.helpers import hello, parsed_event
from tests.ingest_checks import T0, assert_superseded

pytestmark = pytest.mark.django_db


def ev(
    seq: int, to: str, token: int, *, frm: str = "candidate", at: float = 0, **kw
) -> protocol.Event:
    return parsed_event(seq, "e/1", to, token, from_=frm, at=T0 + timedelta(seconds=at), **kw)


def test_it_acks_the_highest_contiguous_seq_and_ignores_replays() -> None:
    actions.register_agent(hello("a", "e/1"))
    first = actions.ingest_events("a", [ev(1, "leader", 1), ev(2, "follower", 1, frm="leader")])
    assert (first.acked, first.stored) == (2, 2)
    again = actions.ingest_events("a", [ev(1, "leader", 1), ev(2, "follower", 1, frm="leader")])
    assert (again.acked, again.stored) == (2, 0)
    assert Transition.objects.count() == 2
    assert Term.objects.get().end_reason == "resigned"


def test_a_gap_holds_the_ack_back_until_it_is_filled() -> None:
    actions.register_agent(hello("a", "e/1"))
    assert actions.ingest_events("a", [ev(1, "candidate", 0)]).acked == 1
    assert actions.ingest_events("a", [ev(3, "leader", 2, at=2)]).acked == 1
    assert actions.ingest_events("a", [ev(2, "follower", 0, at=1)]).acked == 3


def test_a_new_leader_supersedes_the_old_term() -> None:
    actions.register_agent(hello("a", "e/1"))
    actions.register_agent(hello("b", "e/1"))
    actions.ingest_events("a", [ev(1, "leader", 5)])
    actions.ingest_events("b", [ev(1, "leader", 6, at=3)])
    election = Election.objects.get()
    assert (election.leader_id, election.token, election.status) == ("b", 6, "led")
    old, new = Term.objects.order_by("token")
    assert (old.leader_id, old.ended, old.end_reason) == (
        "a",
        T0 + timedelta(seconds=3),
        "superseded",
    )
    assert (new.leader_id, new.ended) == ("b", None)


def test_a_late_event_with_an_older_token_is_history_not_news() -> None:
    actions.register_agent(hello("a", "e/1"))
    actions.register_agent(hello("b", "e/1"))
    actions.ingest_events("b", [ev(1, "leader", 6, at=3)])
    actions.ingest_events("a", [ev(1, "leader", 5)])  # replayed late from a's spool
    assert_superseded("b", 6, "a", 5, at=3)


def test_an_offline_leader_s_term_ends_as_agent_offline() -> None:
    actions.register_agent(hello("a", "e/1"))
    actions.register_agent(hello("b", "e/1"))
    actions.ingest_events("a", [ev(1, "leader", 1)])
    actions.agent_disconnected("a")
    assert Election.objects.get().status == "led"  # visibility never decides leadership
    actions.ingest_events("b", [ev(1, "leader", 2, at=2)])
    assert Term.objects.get(token=1).end_reason == "agent-offline"


def test_resigning_leaves_the_election_leaderless() -> None:
    actions.register_agent(hello("a", "e/1"))
    actions.ingest_events(
        "a", [ev(1, "leader", 1), ev(2, "follower", 1, frm="leader", at=1, reason="lost")]
    )
    election = Election.objects.get()
    assert (election.status, election.leader_id) == ("leaderless", None)
    assert election.leaderless_since == T0 + timedelta(seconds=1)
    assert Term.objects.get().end_reason == "lost"


def test_a_leader_back_in_the_same_term_resumes_it() -> None:
    actions.register_agent(hello("a", "e/1"))
    actions.ingest_events(
        "a",
        [
            ev(1, "leader", 3),
            ev(2, "follower", 3, frm="leader", at=1, reason="expired"),
            ev(3, "leader", 3, at=2),
        ],
    )
    election = Election.objects.get()
    assert (election.status, election.leader_id, election.token) == ("led", "a", 3)
    assert election.leader_since == T0 + timedelta(seconds=2)
    term = Term.objects.get()
    assert (term.ended, term.end_reason) == (None, "")


def test_two_connected_claimants_are_a_split_brain() -> None:
    actions.register_agent(hello("a", "e/1"))
    actions.register_agent(hello("b", "e/1"))
    actions.ingest_events("a", [ev(1, "leader", 1)])
    actions.ingest_events("b", [ev(1, "leader", 2)])
    assert Election.objects.get().status == "led"  # a's step-down may still be on its way

    def claim(agent: str, token: int) -> None:
        state = protocol.ElectionState(state="leader", leader=agent, token=token, ttl_left=5)
        actions.record_heartbeat(agent, protocol.Heartbeat(at=T0, states={"e/1": state}))

    claim("a", 1)
    claim("b", 2)
    assert Election.objects.get().status == "split-brain"


def test_stale_agents_are_marked_offline() -> None:
    actions.register_agent(hello("a", "e/1"))
    Agent.objects.filter(id="a").update(last_seen=T0)
    assert actions.mark_stale_agents(15) == ["a"]
    assert not Agent.objects.get(id="a").connected
    assert actions.mark_stale_agents(15) == []


def test_an_older_event_does_not_undo_a_newer_membership_state() -> None:
    actions.register_agent(hello("a", "e/1"))
    actions.ingest_events("a", [ev(2, "follower", 3, at=5)])
    actions.ingest_events("a", [ev(1, "candidate", 2, at=1)])
    assert Membership.objects.get().state == "follower"


def test_it_announces_changes_only_after_commit(django_capture_on_commit_callbacks) -> None:
    actions.register_agent(hello("a", "e/1"))
    with django_capture_on_commit_callbacks() as callbacks:
        actions.ingest_events("a", [ev(1, "leader", 1)])
    assert len(callbacks) == 1


def test_tokens_are_hashed_and_belong_to_one_agent() -> None:
    token = actions.issue_agent_token("a")
    assert actions.authenticate_agent(token) == "a"
    assert actions.authenticate_agent(token + "x") is None
    assert token not in str(list(Agent.objects.get(id="a").tokens.values()))
    actions.revoke_agent_tokens("a")
    assert actions.authenticate_agent(token) is None


def test_an_agent_cannot_report_an_election_it_is_not_a_member_of() -> None:
    actions.register_agent(hello("b", "e/1"))
    actions.ingest_events("b", [ev(1, "leader", 6)])
    actions.register_agent(hello("a"))  # a hello naming no election
    result = actions.ingest_events("a", [ev(1, "leader", 2**63 - 1, leader="a")])
    assert (result.acked, result.stored, result.refused) == (1, 0, ["e/1"])
    election = Election.objects.get()
    assert (election.leader_id, election.token) == ("b", 6)
    assert Term.objects.get().end_reason == ""
    assert not Transition.objects.filter(agent_id="a").exists()
    assert not Membership.objects.filter(agent_id="a").exists()


def test_a_member_s_absurd_token_is_held_until_another_member_sees_it() -> None:
    for agent in ("a", "b", "c"):
        actions.register_agent(hello(agent, "e/1"))
    actions.ingest_events("b", [ev(1, "leader", 6)])
    for follower in ("a", "c"):
        state = protocol.ElectionState(state="follower", leader="b", token=6)
        actions.record_heartbeat(follower, protocol.Heartbeat(at=T0, states={"e/1": state}))
    poison = 2**63 - 1
    actions.ingest_events("a", [ev(1, "leader", poison, at=1)])
    election = Election.objects.get()
    assert (election.leader_id, election.token) == ("b", 6)  # not believed
    assert (election.suspect_leader, election.suspect_token) == ("a", poison)
    assert AuditEntry.objects.filter(action="claim-held", actor="a").count() == 1
    # b's next real term is still news: tokens of the real leaders keep growing.
    actions.ingest_events("b", [ev(2, "leader", 9, at=2)])
    assert Election.objects.get().token == 9


def test_a_large_but_real_jump_is_believed_once_another_member_sees_it() -> None:
    for agent in ("a", "b"):
        actions.register_agent(hello(agent, "e/1"))
    actions.ingest_events("b", [ev(1, "leader", 6)])
    jump = 6 + terms.SUSPECT_JUMP + 1  # an etcd revision after a busy term, say
    actions.ingest_events("a", [ev(1, "leader", jump, at=1)])
    assert Election.objects.get().leader_id == "b"
    state = protocol.ElectionState(state="follower", leader="a", token=jump)
    actions.record_heartbeat("b", protocol.Heartbeat(at=T0, states={"e/1": state}))
    election = Election.objects.get()
    assert (election.leader_id, election.token, election.suspect_token) == ("a", jump, None)
    assert Term.objects.get(token=6).end_reason == "superseded"
