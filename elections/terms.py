"""The rules of terms, applied to many elections at once: who leads, with which fencing
token, from when to when, and why a term ended.

A ``Ledger`` reads the rows a batch of events touches (elections row-locked in id order,
their members, the terms concerned), applies events in memory in the order they arrived,
exactly as if each were applied on its own, and writes everything back with one statement
per table. The rules:

- a member's state follows its newest event (by agent time: events of one agent can arrive
  late, and an older one must not undo a newer state);
- a "leader" event with a fencing token above the election's opens a term and ends the
  others (``superseded``, or ``agent-offline`` when their agent is gone); tokens only grow;
- a "leader" event with an older token is history, not news: its term is recorded, ended
  where its successor began; the same leader winning again with the same token resumes it;
- leaving the leader state ends that term with the reason the agent gave;
- a term that opens records its failover gap, from the previous leader's last proven lease
  to the win (``elections.gaps``); the batch then re-judges flapping (``elections.flapping``)
  of the elections it opened terms in or that flap, with one query;
- one agent must not be able to rewrite an election with an absurd token (tokens only grow,
  so a believed 2^63-1 would hide every real term after it): a claim whose token is more
  than ``SUSPECT_JUMP`` above both the election's token and every token the *other* members
  report is held as suspect, audited and shown, and believed only once another member
  reports the same leader and token (``confirm``). An election with no other member cannot
  be harmed by a claim of its only member, so nothing is held there.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from operator import attrgetter

from django.db.models import BooleanField, Exists, F, OuterRef, Q
from django.db.models.expressions import RawSQL

import protocol
from elections import audit, flapping, gaps, statuses, webhooks
from elections.models import Election, Membership, Term
from elections.serializers import iso
from elections.sql import update_from_values
from protocol import EndReason, State

#: How far above what an election's other members report a token may jump and be believed
#: at once. Raft terms and the counters grow by ones; etcd and NATS revisions count every
#: write of the cluster, so a long term on a busy cluster can legitimately jump further: such
#: a claim is believed a heartbeat later, when another member sees the same leader.
SUSPECT_JUMP = 1_000_000

_TERM_FIELDS = ("pk", "election_id", "leader_id", "token", "started", "ended", "end_reason", "gap")
#: What a batch may change of an election: read with it, written back when it changed.
_ELECTION_STATE = (
    "token",
    "leader_id",
    "leader_since",
    "leaderless_since",
    "status",
    "suspect_leader",
    "suspect_token",
    "suspect_since",
    "flapping_since",
)
_election_state = attrgetter(*_ELECTION_STATE)


class Ledger:
    """The rows one batch reads, changes in memory and writes back."""

    def __init__(
        self,
        election_ids: Iterable[int],
        memberships: Iterable[Membership],
        tokens: set[tuple[int, int]],
        connected: dict[str, bool],
    ) -> None:
        ids = sorted(set(election_ids))
        self.elections = {
            e.pk: e for e in statuses.locked(ids).only("pk", "name", *_ELECTION_STATE)
        }
        self.memberships = {(m.agent_id, m.election_id): m for m in memberships}
        self.members: dict[int, list[Membership]] = {}
        for m in self.memberships.values():
            self.members.setdefault(m.election_id, []).append(m)
        self.connected = dict(connected)
        # The open terms, and the terms of the tokens this batch speaks of or the elections
        # hold now: by (election, token), never all terms of a long-lived election.
        wanted = tokens | {(e.pk, e.token) for e in self.elections.values() if e.token is not None}
        which = Q(election_id__in=ids, ended__isnull=True)
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
        for t in (
            Term.objects.filter(which)
            .annotate(leader_connected=F("leader__connected"))
            .only(*_TERM_FIELDS)
        ):
            self.connected.setdefault(t.leader_id, t.leader_connected)
            self._add(t)
        self.new_terms: dict[tuple[int, int], Term] = {}
        self.ended_terms: dict[int, Term] = {}
        self.dirty_memberships: dict[int, Membership] = {}
        self.dirty_elections: set[int] = set()
        self.audit: list[audit.Pending] = []
        self.alerts: list[webhooks.Event] = []

    def _add(self, term: Term) -> None:
        self.terms[(term.election_id, term.token)] = term
        self.by_election.setdefault(term.election_id, []).append(term)

    def term(self, election_id: int, token: int) -> Term | None:
        return self.terms.get((election_id, token))

    # -- events ---------------------------------------------------------------------------

    def apply(self, agent_id: str, election_id: int, event: protocol.Event) -> None:
        election = self.elections[election_id]
        self._member(agent_id, election, event)
        if event.to == State.LEADER and event.token is not None:
            self.won(agent_id, election, event.token, event.at)
        elif event.from_ == State.LEADER and event.token is not None:
            self._close(agent_id, election, event.token, event.at, event.reason)

    def _member(self, agent_id: str, election: Election, event: protocol.Event) -> None:
        membership = self.memberships[(agent_id, election.pk)]
        if membership.changed is not None and membership.changed > event.at:
            return
        membership.state = event.to
        membership.changed = event.at
        if event.to == State.LEADER:
            membership.sees_leader, membership.sees_token = agent_id, event.token
        elif membership.sees_leader == agent_id:
            membership.sees_leader, membership.sees_token = "", None
        self.dirty_memberships[membership.pk] = membership

    def won(
        self,
        agent_id: str,
        election: Election,
        token: int,
        at: datetime,
        *,
        confirmed: bool = False,
    ) -> None:
        if election.token is None or election.token < token:
            if not confirmed and self._suspect(agent_id, election, token, at):
                return
            self._open(agent_id, election, token, at)
            return
        term = self.term(election.pk, token)
        if election.token == token and term is not None and term.leader_id == agent_id:
            # The same leader back in the same term (its local lease lapsed under load and it
            # proved it again, e.g. a Raft leader that never lost its quorum): it resumes.
            if election.leader_id is None:
                election.leader_id, election.leader_since = agent_id, at
                election.leaderless_since = None
                self.dirty_elections.add(election.pk)
            if term.ended is not None:
                term.ended, term.end_reason = None, ""
                if term.pk is not None:
                    self.ended_terms[term.pk] = term
            return
        # A late event (replayed from a spool after a newer term was seen): history, not news.
        if term is None:
            successor = self._successor(election.pk, token)
            self._create(
                Term(
                    election_id=election.pk,
                    leader_id=agent_id,
                    token=token,
                    started=at,
                    ended=successor.started if successor else at,
                    end_reason=EndReason.SUPERSEDED,
                )
            )

    def _suspect(self, agent_id: str, election: Election, token: int, at: datetime) -> bool:
        """Hold a claim whose token jumps far beyond what the other members report."""
        others = [m for m in self.members.get(election.pk, ()) if m.agent_id != agent_id]
        if not others:
            return False
        seen = [m.sees_token for m in others if m.sees_token is not None]
        reference = max([election.token or 0, *seen])
        if token - reference <= SUSPECT_JUMP:
            return False
        if (election.suspect_leader, election.suspect_token) != (agent_id, token):
            election.suspect_leader, election.suspect_token = agent_id, token
            election.suspect_since = at
            self.dirty_elections.add(election.pk)
            self.audit.append(
                audit.Pending(
                    audit.Actor.AGENT,
                    agent_id,
                    audit.Action.CLAIM_HELD,
                    election.name,
                    {
                        "token": token,
                        "election_token": election.token,
                        "members_report": max(seen, default=None),
                        "why": f"the token jumps by more than {SUSPECT_JUMP:,} over what the "
                        "other members report; believed once another member sees it",
                    },
                )
            )
        return True

    def _open(self, agent_id: str, election: Election, token: int, at: datetime) -> None:
        previous = self.term(election.pk, election.token) if election.token is not None else None
        gap = None
        if previous is not None:
            old = self.memberships.get((previous.leader_id, election.pk))
            gap = gaps.gap(gaps.last_proven(previous, old.lease_expires if old else None), at)
        self.audit.append(
            audit.Pending(
                audit.Actor.AGENT,
                agent_id,
                audit.Action.LEADER_CHANGED,
                election.name,
                {
                    "leader": agent_id,
                    "token": token,
                    "previous_leader": previous.leader_id if previous else None,
                    "previous_token": previous.token if previous else None,
                    "gap": gap,
                    "agent_time": at.isoformat(),
                },
            )
        )
        for term in self.by_election.get(election.pk, ()):
            if term.ended is None and term.token != token:
                connected = self.connected.get(term.leader_id, False)
                reason = EndReason.SUPERSEDED if connected else EndReason.AGENT_OFFLINE
                self._end(term, max(at, term.started), reason)
        self.alerts.append(
            webhooks.Event(
                webhooks.LEADER_CHANGE,
                election.name,
                {
                    "leader": agent_id,
                    "token": token,
                    "previous_leader": previous.leader_id if previous else None,
                    "previous_token": previous.token if previous else None,
                    "previous_end_reason": (previous.end_reason or None) if previous else None,
                    "leaderless_since": iso(election.leaderless_since),
                },
                at=at,
            )
        )
        election.token, election.leader_id = token, agent_id
        election.leader_since, election.leaderless_since = at, None
        if election.suspect_token is not None and election.suspect_token <= token:
            election.suspect_leader, election.suspect_token, election.suspect_since = "", None, None
        self.dirty_elections.add(election.pk)
        if self.term(election.pk, token) is None:
            self._create(
                Term(election_id=election.pk, leader_id=agent_id, token=token, started=at, gap=gap)
            )

    def _successor(self, election_id: int, token: int) -> Term | None:
        """The first term after ``token`` (a rare path: only late events ask)."""
        known = [t for t in self.by_election.get(election_id, ()) if t.token > token]
        stored = (
            Term.objects.filter(election_id=election_id, token__gt=token)
            .order_by("token")
            .only(*_TERM_FIELDS)
            .first()
        )
        if stored is not None:
            known.append(stored)
        return min(known, key=lambda t: t.token, default=None)

    def _close(
        self, agent_id: str, election: Election, token: int, at: datetime, reason: str | None
    ) -> None:
        term = self.term(election.pk, token)
        if term is not None and term.leader_id == agent_id and term.ended is None:
            self._end(term, at, reason or EndReason.RESIGNED)
        elif term is not None and term.leader_id == agent_id:
            self._refine_gap(term, at)
        if election.leader_id == agent_id and election.token == token:
            election.leader_id, election.leaderless_since = None, at
            self.dirty_elections.add(election.pk)
        if (election.suspect_leader, election.suspect_token) == (agent_id, token):
            election.suspect_leader, election.suspect_token, election.suspect_since = "", None, None
            self.dirty_elections.add(election.pk)

    def _refine_gap(self, term: Term, left: datetime) -> None:
        """The leader of a term a newer win already ended says when it left: measure its
        successor's gap from that report instead of its lease (see ``elections.gaps``)."""
        if term.end_reason not in gaps.ENDED_BY_SUCCESSOR:
            return
        later = [t for t in self.by_election.get(term.election_id, ()) if t.token > term.token]
        successor = min(later, key=lambda t: t.token, default=None)
        # Ended at the successor's win: no term unknown to this batch lies between them.
        if successor is None or successor.started != term.ended:
            return
        successor.gap = gaps.gap(left, successor.started)
        if successor.pk is not None:
            self.ended_terms[successor.pk] = successor

    def _create(self, term: Term) -> None:
        self._add(term)
        self.new_terms[(term.election_id, term.token)] = term

    def _end(self, term: Term, at: datetime, reason: str) -> None:
        term.ended, term.end_reason = at, reason
        if term.pk is not None:
            self.ended_terms[term.pk] = term

    # -- writing --------------------------------------------------------------------------

    def write(self, now: datetime) -> list[int]:
        """Write what changed; the audit entries last. Returns the elections touched."""
        update_from_values(
            Membership,
            ["id"],
            ["state", "changed", "sees_leader", "sees_token"],
            [
                (m.pk, m.state, m.changed, m.sees_leader, m.sees_token)
                for m in self.dirty_memberships.values()
            ],
        )
        Term.objects.bulk_create(list(self.new_terms.values()), ignore_conflicts=True)
        update_from_values(
            Term,
            ["id"],
            ["ended", "end_reason", "gap"],
            [(t.pk, t.ended, t.end_reason, t.gap) for t in self.ended_terms.values()],
        )
        # Statuses read the members just written (same transaction), under the election locks.
        flipped = statuses.derive(self.elections.values(), now)
        # Flapping counts the terms just written: where terms opened, or an election flaps.
        opened = {election_id for election_id, _ in self.new_terms}
        flips = flapping.judge(
            [e for e in self.elections.values() if e.pk in opened or e.flapping_since], now
        )
        self.audit += flips.audit()
        self.alerts += flips.alerts()
        rows = self.dirty_elections | {e.pk for e in flipped} | flips.ids
        update_from_values(
            Election,
            ["id"],
            [*_ELECTION_STATE, "updated"],
            [(e.pk, *_election_state(e), now) for e in (self.elections[pk] for pk in sorted(rows))],
        )
        webhooks.notify_many(self.alerts)  # an outbox row per webhook that wants them
        # The last write: the audit lock is then held only for the commit, never while this
        # transaction waits for row locks (which could deadlock with another agent's ingest).
        audit.record_many(self.audit)
        return sorted(self.elections)


def confirm(election_ids: Iterable[int], now: datetime) -> list[int]:
    """Believe held claims that another member now reports (same leader, same token).

    Runs inside the caller's transaction (a heartbeat's); returns the elections changed.
    """
    corroborating = Membership.objects.filter(
        election=OuterRef("pk"),
        sees_leader=OuterRef("suspect_leader"),
        sees_token=OuterRef("suspect_token"),
    ).exclude(agent_id=OuterRef("suspect_leader"))
    held = list(
        Election.objects.filter(pk__in=list(election_ids), suspect_token__isnull=False)
        .filter(Exists(corroborating))
        .values_list("pk", flat=True)
    )
    if not held:
        return []
    ledger = Ledger(
        held,
        Membership.objects.filter(election_id__in=held),
        set(Election.objects.filter(pk__in=held).values_list("pk", "suspect_token")),
        {},
    )
    for election in ledger.elections.values():
        if election.suspect_token is not None:
            leader, token = election.suspect_leader, election.suspect_token
            ledger.won(leader, election, token, election.suspect_since or now, confirmed=True)
    return ledger.write(now)
