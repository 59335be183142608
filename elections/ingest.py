"""Ingest agents' transitions: idempotent on (agent, seq), set-based.

One call stores any number of ``events`` frames, from any number of agents, with a fixed
number of statements: the transitions go in with one ``INSERT ... ON CONFLICT DO NOTHING``
(a replay changes nothing), then ``elections.terms.Ledger`` applies them in memory over
row-locked elections, in the order they arrived, and writes each table once.

An agent reports only elections it is a member of (its hello made it one). Events for any
other election are refused: not stored and not applied, answered with an error naming the
elections, audited, and acked all the same, so that they do not come back from the spool
forever. One agent's token can therefore never touch another's election.

Locks are taken agents first, then elections, each in key order, then the audit lock last,
so concurrent batches never deadlock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from django.db import transaction
from django.utils import timezone

import protocol
from elections import audit
from elections.broadcast import elections_changed
from elections.models import Agent, Election, Membership, Transition
from elections.sql import insert_ignore_returning, update_from_values
from elections.terms import Ledger
from protocol import State


@dataclass(frozen=True)
class Frame:
    """One ``events`` frame of one agent."""

    agent_id: str
    events: Sequence[protocol.Event]


@dataclass
class IngestResult:
    #: The highest seq stored with no gap below it: what the agent may drop from its spool.
    acked: int
    stored: int
    #: Elections named by events of this frame that the agent is not a member of.
    refused: list[str] = field(default_factory=list)


TRANSITION_FIELDS = [
    "agent",
    "election",
    "seq",
    "from_state",
    "to_state",
    "token",
    "leader",
    "agent_time",
    "received",
    "detail",
    "reason",
]


@transaction.atomic
def ingest_frames(frames: Sequence[Frame]) -> list[IngestResult]:
    """Store and apply the frames' events; one result per frame, in order."""
    now = timezone.now()
    agent_ids = sorted({f.agent_id for f in frames})
    agents = {
        a.pk: a
        for a in Agent.objects.select_for_update()
        .filter(pk__in=agent_ids)
        .order_by("pk")
        .only("pk", "last_seq", "max_seq", "connected")
    }
    missing_agents = set(agent_ids) - set(agents)
    if missing_agents:
        raise LookupError(f"unknown agent(s): {', '.join(sorted(missing_agents))}")

    names = {e.election for f in frames for e in f.events}
    election_ids = dict(Election.objects.filter(name__in=names).values_list("name", "pk"))
    # Every member of the elections named: who may report them, and what the others see.
    memberships = list(Membership.objects.filter(election_id__in=list(election_ids.values())))
    members = {(m.agent_id, m.election_id) for m in memberships}

    # Each frame's events in seq order; a seq twice in one batch counts once.
    ordered: list[tuple[str, protocol.Event]] = []
    refused: list[tuple[str, protocol.Event]] = []
    queued: set[tuple[str, int]] = set()
    for f in frames:
        for event in sorted(f.events, key=lambda e: e.seq):
            if (f.agent_id, event.seq) in queued:
                continue
            queued.add((f.agent_id, event.seq))
            if (f.agent_id, election_ids.get(event.election)) in members:
                ordered.append((f.agent_id, event))
            else:
                refused.append((f.agent_id, event))
    inserted = insert_ignore_returning(
        Transition,
        TRANSITION_FIELDS,
        [
            (
                agent_id,
                election_ids[e.election],
                e.seq,
                e.from_,
                e.to,
                e.token,
                e.leader or "",
                e.at,
                now,
                e.detail,
                e.reason or "",
            )
            for agent_id, e in ordered
        ],
        conflict=["agent", "seq"],
        returning=["agent", "seq"],
    )
    new = set(inserted)
    fresh = [(a, e) for a, e in ordered if (a, e.seq) in new]

    connected = {a.pk: a.connected for a in agents.values()}  # before this batch marks them
    acked = _advance(agents, fresh, refused, now)
    ledger_audit = _refusals(refused)
    changed: list[int] = []
    if fresh:
        tokens = {(election_ids[e.election], e.token) for _, e in fresh if e.token is not None}
        touched = {election_ids[e.election] for _, e in fresh}
        ledger = Ledger(
            touched, [m for m in memberships if m.election_id in touched], tokens, connected
        )
        for agent_id, event in fresh:
            ledger.apply(agent_id, election_ids[event.election], event)
        ledger.audit[:0] = ledger_audit
        changed = ledger.write(now)  # writes the audit entries last
    else:
        audit.record_many(ledger_audit)
    refused_ids = {id(e) for _, e in refused}
    results = []
    for f in frames:
        results.append(
            IngestResult(
                acked=acked[f.agent_id],
                stored=sum(1 for e in f.events if (f.agent_id, e.seq) in new),
                refused=sorted({e.election for e in f.events if id(e) in refused_ids}),
            )
        )
        new -= {(f.agent_id, e.seq) for e in f.events}  # a duplicate frame stored nothing
    elections_changed(changed)
    return results


def _refusals(refused: list[tuple[str, protocol.Event]]) -> list[audit.Pending]:
    """One audit entry per agent whose events named elections it is not a member of."""
    by_agent: dict[str, list[protocol.Event]] = {}
    for agent_id, event in refused:
        by_agent.setdefault(agent_id, []).append(event)
    return [
        audit.Pending(
            audit.Actor.AGENT,
            agent_id,
            audit.Action.EVENTS_REFUSED,
            events[0].election,
            {
                "why": "not a member of the election (not in any hello of this agent)",
                "elections": sorted({e.election for e in events})[:20],
                "events": len(events),
                "claims": [
                    {"election": e.election, "token": e.token}
                    for e in events
                    if e.to == State.LEADER
                ][:20],
            },
        )
        for agent_id, events in sorted(by_agent.items())
    ]


# -- acks -----------------------------------------------------------------------------------


def _advance(
    agents: dict[str, Agent],
    fresh: list[tuple[str, protocol.Event]],
    refused: list[tuple[str, protocol.Event]],
    now: datetime,
) -> dict[str, int]:
    """Move each agent's contiguous seq past what this batch stored or refused (refused
    events are answered, so they count as consumed); write the agents."""
    seqs: dict[str, list[int]] = {a: [] for a in agents}
    consumed: dict[str, set[int]] = {a: set() for a in agents}
    for agent_id, event in [*fresh, *refused]:
        seqs[agent_id].append(event.seq)
        consumed[agent_id].add(event.seq)
    rows = []
    for agent_id, agent in agents.items():
        new = sorted(seqs[agent_id])
        top = max([agent.max_seq, *new])
        if agent.max_seq != agent.last_seq:
            # A gap was already waiting (or max_seq predates its column): read what is stored.
            stored = Transition.objects.filter(agent_id=agent_id, seq__gt=agent.last_seq)
            new = sorted(set(stored.values_list("seq", flat=True)) | consumed[agent_id])
            top = max([agent.last_seq, *new])
        last = agent.last_seq
        for seq in new:
            if seq != last + 1:
                break
            last = seq
        agent.last_seq, agent.max_seq = last, top
        rows.append((agent_id, last, top, now, True))
    update_from_values(Agent, ["id"], ["last_seq", "max_seq", "last_seen", "connected"], rows)
    return {a: agent.last_seq for a, agent in agents.items()}
