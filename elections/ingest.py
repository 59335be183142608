"""Ingest agents' transitions: idempotent on (agent, seq), set-based.

One call stores any number of ``events`` frames, from any number of agents, with a fixed
number of statements: the transitions go in with one ``INSERT ... ON CONFLICT DO NOTHING``
(a replay changes nothing), and memberships, terms, elections and agents are each read once
and written once. The rules are applied in memory over row-locked elections, in the order
the events arrived, exactly as if each event were applied on its own:

- a member's state follows its newest event (by agent time: events of one agent can arrive
  late, and an older one must not undo a newer state);
- a "leader" event with a fencing token above the election's opens a term and ends the
  others (``superseded``, or ``agent-offline`` when their agent is gone); tokens only grow;
- a "leader" event with an older token is history, not news: its term is recorded, ended
  where its successor began;
- leaving the leader state ends that term with the reason the agent gave; the same leader
  winning again with the same token resumes it.

Locks are taken agents first, then elections, each in key order, then the audit lock last,
so concurrent batches never deadlock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from django.db import transaction
from django.db.models import BooleanField, F, Q
from django.db.models.expressions import RawSQL
from django.utils import timezone

from agent import protocol
from elections import audit, statuses
from elections.broadcast import elections_changed
from elections.models import Agent, Election, Membership, Term, Transition
from elections.sql import insert_ignore_returning, update_from_values


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
    unknown_elections: list[str] = field(default_factory=list)


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
    unknown = names - set(election_ids)
    if unknown:  # never lose an event: keep it under an election we learn of now
        Election.objects.bulk_create(
            [Election(name=n) for n in sorted(unknown)], ignore_conflicts=True
        )
        election_ids.update(Election.objects.filter(name__in=unknown).values_list("name", "pk"))

    # Each frame's events in seq order; a seq twice in one batch counts once.
    ordered: list[tuple[str, protocol.Event]] = []
    queued: set[tuple[str, int]] = set()
    for f in frames:
        for event in sorted(f.events, key=lambda e: e.seq):
            if (f.agent_id, event.seq) not in queued:
                queued.add((f.agent_id, event.seq))
                ordered.append((f.agent_id, event))
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
    acked = _advance(agents, fresh, now)
    changed: list[int] = []
    if fresh:
        changed = _apply(fresh, election_ids, connected, now)  # writes the audit entries last
    stored: dict[str, int] = {}
    for agent_id, _ in fresh:
        stored[agent_id] = stored.get(agent_id, 0) + 1
    results = []
    for f in frames:
        frame_names = {e.election for e in f.events}
        results.append(
            IngestResult(
                acked=acked[f.agent_id],
                stored=sum(1 for e in f.events if (f.agent_id, e.seq) in new),
                unknown_elections=sorted(frame_names & unknown),
            )
        )
        new -= {(f.agent_id, e.seq) for e in f.events}  # a duplicate frame stored nothing
    elections_changed(changed)
    return results


# -- applying fresh events ------------------------------------------------------------------


_TERM_FIELDS = ("pk", "election_id", "leader_id", "token", "started", "ended", "end_reason")


class _Batch:
    """The rows one batch reads, changes in memory and writes back."""

    def __init__(
        self, election_ids: list[int], pairs: set[tuple[str, int]], tokens: set[tuple[int, int]]
    ) -> None:
        self.elections = {e.pk: e for e in statuses.locked(election_ids)}
        agents = {a for a, _ in pairs}
        self.memberships = {
            (m.agent_id, m.election_id): m
            for m in Membership.objects.filter(election_id__in=election_ids, agent_id__in=agents)
            if (m.agent_id, m.election_id) in pairs
        }
        # The open terms, and the terms of the tokens this batch speaks of or the elections
        # hold now: by (election, token), never all terms of a long-lived election.
        wanted = tokens | {(e.pk, e.token) for e in self.elections.values() if e.token is not None}
        which = Q(election_id__in=election_ids, ended__isnull=True)
        if wanted:
            pairs_sql = ", ".join(["(%s, %s)"] * len(wanted))
            which |= Q(
                RawSQL(
                    f'("elections_term"."election_id", "elections_term"."token") IN '
                    f"(VALUES {pairs_sql})",
                    [value for pair in sorted(wanted) for value in pair],
                    output_field=BooleanField(),
                )
            )
        self.terms: dict[tuple[int, int], Term] = {}
        #: Terms per election, to end the open ones without scanning every term of the batch.
        self.by_election: dict[int, list[Term]] = {}
        self.connected: dict[str, bool] = {}
        for t in (
            Term.objects.filter(which)
            .annotate(leader_connected=F("leader__connected"))
            .only(*_TERM_FIELDS)
        ):
            self.connected[t.leader_id] = t.leader_connected
            self._add(t)
        self.new_terms: dict[tuple[int, int], Term] = {}
        self.ended_terms: dict[int, Term] = {}
        self.dirty_memberships: dict[int, Membership] = {}
        self.dirty_elections: set[int] = set()
        self.leader_changes: list[audit.Pending] = []

    def _add(self, term: Term) -> None:
        self.terms[(term.election_id, term.token)] = term
        self.by_election.setdefault(term.election_id, []).append(term)

    def term(self, election_id: int, token: int) -> Term | None:
        return self.terms.get((election_id, token))


def _apply(
    fresh: list[tuple[str, protocol.Event]],
    election_ids: dict[str, int],
    connected: dict[str, bool],
    now: datetime,
) -> list[int]:
    touched = sorted({election_ids[e.election] for _, e in fresh})
    pairs = {(a, election_ids[e.election]) for a, e in fresh}
    tokens = {(election_ids[e.election], e.token) for _, e in fresh if e.token is not None}
    batch = _Batch(touched, pairs, tokens)
    _ensure_memberships(batch, fresh, election_ids)
    batch.connected.update(connected)

    for agent_id, event in fresh:
        election = batch.elections[election_ids[event.election]]
        _member(batch, agent_id, election, event)
        if event.to == "leader" and event.token is not None:
            _open_term(batch, agent_id, election, event.token, event.at)
        elif event.from_ == "leader" and event.token is not None:
            _close_term(batch, agent_id, election, event.token, event.at, event.reason)

    _write(batch, now)
    return touched


def _ensure_memberships(
    batch: _Batch, fresh: list[tuple[str, protocol.Event]], election_ids: dict[str, int]
) -> None:
    """Events for an election the agent did not announce still make it a member."""
    wanted = {(a, election_ids[e.election]) for a, e in fresh}
    missing = wanted - set(batch.memberships)
    if not missing:
        return
    Membership.objects.bulk_create(
        [Membership(agent_id=a, election_id=e) for a, e in sorted(missing)],
        ignore_conflicts=True,
    )
    for m in Membership.objects.filter(
        election_id__in={e for _, e in missing}, agent_id__in={a for a, _ in missing}
    ):
        batch.memberships.setdefault((m.agent_id, m.election_id), m)


def _member(batch: _Batch, agent_id: str, election: Election, event: protocol.Event) -> None:
    membership = batch.memberships[(agent_id, election.pk)]
    # An older event must not undo a newer state (events of one agent can arrive late).
    if membership.changed is not None and membership.changed > event.at:
        return
    membership.state = event.to
    membership.changed = event.at
    if event.to == "leader":
        membership.sees_leader, membership.sees_token = agent_id, event.token
    elif membership.sees_leader == agent_id:
        membership.sees_leader, membership.sees_token = "", None
    batch.dirty_memberships[membership.pk] = membership


def _open_term(batch: _Batch, agent_id: str, election: Election, token: int, at: datetime) -> None:
    if election.token is None or election.token < token:
        previous = batch.term(election.pk, election.token) if election.token is not None else None
        batch.leader_changes.append(
            audit.Pending(
                "agent",
                agent_id,
                "leader-changed",
                election.name,
                {
                    "leader": agent_id,
                    "token": token,
                    "previous_leader": previous.leader_id if previous else None,
                    "previous_token": previous.token if previous else None,
                    "agent_time": at.isoformat(),
                },
            )
        )
        for term in batch.by_election.get(election.pk, ()):
            if term.ended is None and term.token != token:
                connected = batch.connected.get(term.leader_id, False)
                _end(
                    batch,
                    term,
                    max(at, term.started),
                    "superseded" if connected else "agent-offline",
                )
        election.token, election.leader_id = token, agent_id
        election.leader_since, election.leaderless_since = at, None
        batch.dirty_elections.add(election.pk)
        if batch.term(election.pk, token) is None:
            _create(
                batch, Term(election_id=election.pk, leader_id=agent_id, token=token, started=at)
            )
        return
    term = batch.term(election.pk, token)
    if election.token == token and term is not None and term.leader_id == agent_id:
        # The same leader back in the same term (its local lease lapsed under load and it
        # proved it again, e.g. a Raft leader that never lost its quorum): the term resumes.
        if election.leader_id is None:
            election.leader_id, election.leader_since, election.leaderless_since = (
                agent_id,
                at,
                None,
            )
            batch.dirty_elections.add(election.pk)
        if term.ended is not None:
            term.ended, term.end_reason = None, ""
            if term.pk is not None:
                batch.ended_terms[term.pk] = term
        return
    # A late event (replayed from a spool after a newer term was seen): history, not news.
    if term is None:
        successor = _successor(batch, election.pk, token)
        _create(
            batch,
            Term(
                election_id=election.pk,
                leader_id=agent_id,
                token=token,
                started=at,
                ended=successor.started if successor else at,
                end_reason="superseded",
            ),
        )


def _successor(batch: _Batch, election_id: int, token: int) -> Term | None:
    """The first term after ``token`` (a rare path: only late events ask)."""
    known = [t for t in batch.by_election.get(election_id, ()) if t.token > token]
    stored = (
        Term.objects.filter(election_id=election_id, token__gt=token)
        .order_by("token")
        .only(*_TERM_FIELDS)
        .first()
    )
    if stored is not None:
        known.append(stored)
    return min(known, key=lambda t: t.token, default=None)


def _close_term(
    batch: _Batch, agent_id: str, election: Election, token: int, at: datetime, reason: str | None
) -> None:
    term = batch.term(election.pk, token)
    if term is not None and term.leader_id == agent_id and term.ended is None:
        _end(batch, term, at, reason or "resigned")
    if election.leader_id == agent_id and election.token == token:
        election.leader_id, election.leaderless_since = None, at
        batch.dirty_elections.add(election.pk)


def _create(batch: _Batch, term: Term) -> None:
    batch._add(term)
    batch.new_terms[(term.election_id, term.token)] = term


def _end(batch: _Batch, term: Term, at: datetime, reason: str) -> None:
    term.ended, term.end_reason = at, reason
    if term.pk is not None:
        batch.ended_terms[term.pk] = term


def _write(batch: _Batch, now: datetime) -> None:
    update_from_values(
        Membership,
        ["id"],
        ["state", "changed", "sees_leader", "sees_token"],
        [
            (m.pk, m.state, m.changed, m.sees_leader, m.sees_token)
            for m in batch.dirty_memberships.values()
        ],
    )
    Term.objects.bulk_create(list(batch.new_terms.values()), ignore_conflicts=True)
    update_from_values(
        Term,
        ["id"],
        ["ended", "end_reason"],
        [(t.pk, t.ended, t.end_reason) for t in batch.ended_terms.values()],
    )
    # Statuses read the members just written (same transaction), under the election locks.
    flipped = statuses.derive(batch.elections.values(), now)
    rows = batch.dirty_elections | {e.pk for e in flipped}
    update_from_values(
        Election,
        ["id"],
        ["token", "leader", "leader_since", "leaderless_since", "status", "updated"],
        [
            (e.pk, e.token, e.leader_id, e.leader_since, e.leaderless_since, e.status, now)
            for e in (batch.elections[pk] for pk in sorted(rows))
        ],
    )
    # The last write: the audit lock is then held only for the commit, never while this
    # transaction waits for row locks (which could deadlock with another agent's ingest).
    audit.record_many(batch.leader_changes)


# -- acks -----------------------------------------------------------------------------------


def _advance(
    agents: dict[str, Agent], fresh: list[tuple[str, protocol.Event]], now: datetime
) -> dict[str, int]:
    """Move each agent's contiguous seq past what this batch stored; write the agents."""
    seqs: dict[str, list[int]] = {a: [] for a in agents}
    for agent_id, event in fresh:
        seqs[agent_id].append(event.seq)
    rows = []
    for agent_id, agent in agents.items():
        new = sorted(seqs[agent_id])
        top = max([agent.max_seq, *new])
        if agent.max_seq != agent.last_seq:
            # A gap was already waiting (or max_seq predates its column): read what is stored.
            new = list(
                Transition.objects.filter(agent_id=agent_id, seq__gt=agent.last_seq)
                .order_by("seq")
                .values_list("seq", flat=True)
            )
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
