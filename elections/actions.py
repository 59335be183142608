"""Every state change of the elections domain, one function each.

Each action runs in a transaction and announces what it changed on commit
(``broadcast.elections_changed``). The websocket consumer, the Celery tasks and the tests
all call these; nothing else writes the tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.contrib.auth.base_user import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from agent import protocol
from elections import audit, tokens
from elections.broadcast import elections_changed
from elections.models import Agent, AgentToken, ApiToken, Election, Membership, Term, Transition

# -- agents and tokens ------------------------------------------------------------------


def issue_agent_token(agent_id: str, *, by: str = "system") -> str:
    """Create (or reuse) the agent and give it a new token; the token is returned once."""
    token = tokens.new_token("ela")
    with transaction.atomic():
        agent, _ = Agent.objects.get_or_create(id=agent_id)
        row = AgentToken.objects.create(agent=agent, digest=tokens.digest(token))
        audit.record("system", by, "agent-token-issued", agent_id, {"token_id": row.pk})
    return token


@transaction.atomic
def revoke_agent_tokens(agent_id: str, *, by: str = "system") -> int:
    count = AgentToken.objects.filter(agent_id=agent_id, revoked__isnull=True).update(
        revoked=timezone.now()
    )
    audit.record("system", by, "agent-token-revoked", agent_id, {"count": count})
    return count


def authenticate_agent(token: str | None) -> str | None:
    """The agent id a token belongs to, or None."""
    if not token:
        return None
    row = (
        AgentToken.objects.filter(digest=tokens.digest(token), revoked__isnull=True)
        .values_list("id", "agent_id")
        .first()
    )
    if row is None:
        return None
    AgentToken.objects.filter(id=row[0]).update(last_used=timezone.now())
    return row[1]


def issue_api_token(user: AbstractBaseUser, *, by: str = "system") -> str:
    """A new API token acting as ``user``; returned once, stored as a digest."""
    token = tokens.new_token("elu")
    with transaction.atomic():
        row = ApiToken.objects.create(user=user, digest=tokens.digest(token))
        audit.record("system", by, "api-token-issued", user.get_username(), {"token_id": row.pk})
    return token


@transaction.atomic
def revoke_api_tokens(user: AbstractBaseUser, *, by: str = "system") -> int:
    count = ApiToken.objects.filter(user=user, revoked__isnull=True).update(revoked=timezone.now())
    audit.record("system", by, "api-token-revoked", user.get_username(), {"count": count})
    return count


def authenticate_api_token(token: str) -> AbstractBaseUser | None:
    """The active user an unrevoked API token acts as, or None; notes when it was used."""
    row = (
        ApiToken.objects.filter(
            digest=tokens.digest(token), revoked__isnull=True, user__is_active=True
        )
        .select_related("user")
        .first()
    )
    if row is None:
        return None
    ApiToken.objects.filter(pk=row.pk).update(last_used=timezone.now())
    return row.user


# -- the agent's session ----------------------------------------------------------------


@transaction.atomic
def register_agent(hello: protocol.Hello) -> int:
    """An agent connected and said hello: record it and its elections; return its stored seq."""
    now = timezone.now()
    agent, _ = Agent.objects.select_for_update().get_or_create(id=hello.agent)
    agent.hostname, agent.version = hello.hostname, hello.version
    agent.connected, agent.connected_at, agent.last_seen = True, now, now
    agent.save()
    changed = []
    for info in hello.elections:
        election, _ = Election.objects.update_or_create(
            name=info.name,
            defaults={"backend": info.backend, "labels": info.labels, "ttl": info.ttl},
        )
        Membership.objects.get_or_create(agent=agent, election=election)
        changed.append(election.pk)
    changed += _refresh_status(Election.objects.filter(memberships__agent=agent))
    elections_changed(changed)
    return agent.last_seq


@transaction.atomic
def agent_disconnected(agent_id: str) -> None:
    Agent.objects.filter(id=agent_id).update(connected=False, last_seen=timezone.now())
    ids = list(Election.objects.filter(memberships__agent_id=agent_id).values_list("pk", flat=True))
    _refresh_status(Election.objects.filter(pk__in=ids))
    elections_changed(ids)


@dataclass
class IngestResult:
    acked: int
    stored: int
    unknown_elections: list[str]


@transaction.atomic
def ingest_events(agent_id: str, events: Sequence[protocol.Event]) -> IngestResult:
    """Store an agent's transitions and apply them, idempotently on (agent, seq).

    A replayed event is recognised by its seq and changes nothing. Returns the highest seq
    stored with no gap below it (what the agent may drop from its spool).
    """
    now = timezone.now()
    agent = Agent.objects.select_for_update().get(id=agent_id)
    seqs = [e.seq for e in events]
    existing = set(
        Transition.objects.filter(agent=agent, seq__in=seqs).values_list("seq", flat=True)
    )
    fresh = sorted(
        {e.seq: e for e in events if e.seq not in existing}.values(), key=lambda e: e.seq
    )

    names = {e.election for e in fresh}
    elections = {e.name: e for e in Election.objects.filter(name__in=names)}
    unknown = sorted(names - set(elections))
    for name in unknown:  # never lose an event: keep it under an election we learn of now
        elections[name] = Election.objects.create(name=name)

    Transition.objects.bulk_create(
        [
            Transition(
                agent=agent,
                election=elections[e.election],
                seq=e.seq,
                from_state=e.from_,
                to_state=e.to,
                token=e.token,
                leader=e.leader or "",
                agent_time=e.at,
                received=now,
                detail=e.detail,
                reason=e.reason or "",
            )
            for e in fresh
        ]
    )
    touched: set[int] = set()
    leader_changes: list[audit.Pending] = []
    for event in fresh:
        election = elections[event.election]
        _apply(agent, election, event, leader_changes)
        touched.add(election.pk)

    agent.last_seq = _contiguous(agent)
    agent.last_seen = now
    agent.connected = True
    agent.save(update_fields=["last_seq", "last_seen", "connected"])
    _refresh_status(Election.objects.filter(pk__in=touched))
    # The last write: the audit lock is then held only for the commit, never while this
    # transaction waits for row locks (which could deadlock with another agent's ingest).
    audit.record_many(leader_changes)
    elections_changed(touched)
    return IngestResult(acked=agent.last_seq, stored=len(fresh), unknown_elections=unknown)


def _contiguous(agent: Agent) -> int:
    last = agent.last_seq
    later = Transition.objects.filter(agent=agent, seq__gt=last).order_by("seq")
    for seq in later.values_list("seq", flat=True).iterator():
        if seq != last + 1:
            break
        last = seq
    return last


def _apply(
    agent: Agent, election: Election, event: protocol.Event, leader_changes: list[audit.Pending]
) -> None:
    membership, _ = Membership.objects.get_or_create(agent=agent, election=election)
    # An older event must not undo a newer state (events of one agent can arrive late).
    if membership.changed is None or membership.changed <= event.at:
        membership.state = event.to
        membership.changed = event.at
        if event.to == "leader":
            membership.sees_leader, membership.sees_token = agent.id, event.token
        elif membership.sees_leader == agent.id:
            membership.sees_leader, membership.sees_token = "", None
        membership.save()
    if event.to == "leader" and event.token is not None:
        open_term(election, agent, event.token, event.at, leader_changes=leader_changes)
    elif event.from_ == "leader" and event.token is not None:
        close_term(election, agent, event.token, event.at, event.reason or "resigned")


def open_term(
    election: Election,
    agent: Agent,
    token: int,
    at: datetime,
    *,
    leader_changes: list[audit.Pending] | None = None,
) -> None:
    """``agent`` won ``election`` with fencing ``token``. Tokens only grow (compare-and-set).

    A new term is audited as "leader-changed": at once, or appended to ``leader_changes``
    for the caller to record as the last write of its transaction.
    """
    won = Election.objects.filter(
        Q(token__isnull=True) | Q(token__lt=token), pk=election.pk
    ).update(token=token, leader=agent, leader_since=at, leaderless_since=None)
    if won:
        previous = (
            Term.objects.filter(election=election, token__lt=token)
            .order_by("-token")
            .values_list("leader_id", "token")
            .first()
        )
        change = audit.Pending(
            "agent",
            agent.id,
            "leader-changed",
            election.name,
            {
                "leader": agent.id,
                "token": token,
                "previous_leader": previous[0] if previous else None,
                "previous_token": previous[1] if previous else None,
                "agent_time": at.isoformat(),
            },
        )
        if leader_changes is None:
            audit.record_many([change])
        else:
            leader_changes.append(change)
        for term in (
            Term.objects.filter(election=election, ended__isnull=True)
            .exclude(token=token)
            .select_related("leader")
        ):
            term.ended = max(at, term.started)
            term.end_reason = "superseded" if term.leader.connected else "agent-offline"
            term.save(update_fields=["ended", "end_reason"])
        _create_term(election, agent, token, at, None, "")
        return
    # A late event (replayed from a spool after a newer term was seen): history, not news.
    if not Term.objects.filter(election=election, token=token).exists():
        successor = (
            Term.objects.filter(election=election, token__gt=token).order_by("token").first()
        )
        _create_term(
            election, agent, token, at, successor.started if successor else at, "superseded"
        )


def _create_term(
    election: Election, agent: Agent, token: int, at: datetime, ended: datetime | None, reason: str
) -> None:
    try:
        with transaction.atomic():
            Term.objects.create(
                election=election,
                leader=agent,
                token=token,
                started=at,
                ended=ended,
                end_reason=reason,
            )
    except IntegrityError:
        pass  # the same term reported twice (e.g. a restart of the agent): keep the first


def close_term(election: Election, agent: Agent, token: int, at: datetime, reason: str) -> None:
    Term.objects.filter(election=election, leader=agent, token=token, ended__isnull=True).update(
        ended=at, end_reason=reason
    )
    Election.objects.filter(pk=election.pk, leader=agent, token=token).update(
        leader=None, leaderless_since=at
    )


@transaction.atomic
def record_heartbeat(agent_id: str, heartbeat: protocol.Heartbeat) -> None:
    """Refresh liveness and each membership's view; announce only what changed."""
    now = timezone.now()
    Agent.objects.filter(id=agent_id).update(last_seen=now, connected=True)
    changed: list[int] = []
    claims: list[int] = []
    memberships = Membership.objects.filter(
        agent_id=agent_id, election__name__in=list(heartbeat.states)
    ).select_related("election")
    for membership in memberships:
        seen = heartbeat.states[membership.election.name]
        expires = now + timedelta(seconds=seen.ttl_left) if seen.ttl_left is not None else None
        view = (seen.state, seen.leader or "", seen.token)
        if view != (membership.state, membership.sees_leader, membership.sees_token):
            changed.append(membership.election_id)
        elif seen.state == "leader":
            claims.append(membership.election_id)  # a renewed lease may reveal a split brain
        membership.state, membership.sees_leader, membership.sees_token = view
        membership.lease_expires = expires
    Membership.objects.bulk_update(
        memberships, ["state", "sees_leader", "sees_token", "lease_expires"]
    )
    if changed or claims:
        flipped = _refresh_status(Election.objects.filter(pk__in=changed + claims))
        elections_changed(changed + flipped)


# -- periodic work ------------------------------------------------------------------------


@transaction.atomic
def mark_stale_agents(stale_after: float) -> list[str]:
    """Agents silent for ``stale_after`` seconds are offline (their socket died unseen)."""
    cutoff = timezone.now() - timedelta(seconds=stale_after)
    stale = list(
        Agent.objects.filter(connected=True, last_seen__lt=cutoff).values_list("id", flat=True)
    )
    if stale:
        Agent.objects.filter(id__in=stale).update(connected=False)
        ids = list(
            Election.objects.filter(memberships__agent_id__in=stale)
            .values_list("pk", flat=True)
            .distinct()
        )
        _refresh_status(Election.objects.filter(pk__in=ids))
        elections_changed(ids)
    return stale


@transaction.atomic
def refresh_all_statuses() -> int:
    changed = _refresh_status(Election.objects.all())
    elections_changed(changed)
    return len(changed)


def _refresh_status(elections: Iterable[Election]) -> list[int]:
    """Derive each election's status from its members; return the ids whose status changed.

    split-brain: more than one connected agent reports, in its heartbeat, a leader lease that
    has not run out yet (events alone are not enough: the old leader's "stepped down" may
    simply arrive after the new leader's "won"); leaderless: nobody holds the seat.
    """
    changed = []
    now = timezone.now()
    for election in elections:
        claimants = set(
            Membership.objects.filter(
                election=election, state="leader", agent__connected=True, lease_expires__gt=now
            ).values_list("agent_id", flat=True)
        )
        if len(claimants) > 1:
            status = Election.Status.SPLIT_BRAIN
        elif election.leader_id is None and not claimants:
            status = Election.Status.LEADERLESS
        else:
            status = Election.Status.LED
        if status == Election.Status.LEADERLESS and election.leaderless_since is None:
            # New elections start leaderless: the clock starts when we first see them.
            Election.objects.filter(pk=election.pk, leaderless_since__isnull=True).update(
                leaderless_since=now
            )
        if Election.objects.filter(pk=election.pk).exclude(status=status).update(status=status):
            changed.append(election.pk)
    return changed
