"""Every state change of the elections domain, one function each.

Each action runs in a transaction and announces what it changed on commit
(``broadcast.elections_changed``). The websocket consumer, the Celery tasks and the tests
all call these; nothing else writes the tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.contrib.auth.base_user import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

import protocol
from elections import audit, heartbeats, statuses, tokens
from elections.broadcast import elections_changed
from elections.ingest import Frame, IngestResult, ingest_frames
from elections.models import Agent, AgentToken, ApiToken, Election, Membership, Transition
from elections.sql import update_from_values

# -- agents and tokens ------------------------------------------------------------------


def issue_agent_token(agent_id: str, *, by: str = "system") -> str:
    """Create (or reuse) the agent and give it a new token; the token is returned once."""
    token = tokens.new_token("ela")
    with transaction.atomic():
        agent, _ = Agent.objects.get_or_create(id=agent_id)
        row = AgentToken.objects.create(agent=agent, digest=tokens.digest(token))
        audit.record(
            audit.Actor.SYSTEM, by, audit.Action.AGENT_TOKEN_ISSUED, agent_id, {"token_id": row.pk}
        )
    return token


@transaction.atomic
def revoke_agent_tokens(agent_id: str, *, by: str = "system") -> int:
    count = AgentToken.objects.filter(agent_id=agent_id, revoked__isnull=True).update(
        revoked=timezone.now()
    )
    audit.record(
        audit.Actor.SYSTEM, by, audit.Action.AGENT_TOKEN_REVOKED, agent_id, {"count": count}
    )
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
        audit.record(
            audit.Actor.SYSTEM,
            by,
            audit.Action.API_TOKEN_ISSUED,
            user.get_username(),
            {"token_id": row.pk},
        )
    return token


@transaction.atomic
def revoke_api_tokens(user: AbstractBaseUser, *, by: str = "system") -> int:
    count = ApiToken.objects.filter(user=user, revoked__isnull=True).update(revoked=timezone.now())
    audit.record(
        audit.Actor.SYSTEM,
        by,
        audit.Action.API_TOKEN_REVOKED,
        user.get_username(),
        {"count": count},
    )
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


@dataclass
class Session:
    """What a hello established: the seq the dashboard holds and the agent's memberships."""

    last_seq: int
    members: dict[str, heartbeats.Member]


class TooManyElections(Exception):
    """A hello would make the agent a member of more elections than one agent may have."""


@transaction.atomic
def register_agent(hello: protocol.Hello, session: str = "") -> Session:
    """An agent connected and said hello: record it and its elections (a fixed number of
    statements, whatever their number); return its stored seq and memberships.

    The limit of elections holds per agent, not per hello: repeated hellos naming new
    elections each time cannot grow an agent's memberships (or the elections table) past it.
    """
    now = timezone.now()
    agent, _ = Agent.objects.select_for_update().get_or_create(id=hello.agent)
    joined = set(Membership.objects.filter(agent=agent).values_list("election__name", flat=True))
    total = len(joined | {info.name for info in hello.elections})
    if total > protocol.MAX_ELECTIONS_PER_AGENT:
        raise TooManyElections(
            f"this hello would make {hello.agent} a member of {total} elections; one agent may "
            f"be in at most {protocol.MAX_ELECTIONS_PER_AGENT}"
        )
    agent.hostname, agent.version, agent.session = hello.hostname, hello.version, session
    agent.connected, agent.connected_at, agent.last_seen = True, now, now
    agent.forgotten = None  # forgotten while away: its hello brings it back
    agent.save()

    wanted = {info.name: info for info in hello.elections}
    known = {
        name: (pk, backend, labels, ttl)
        for pk, name, backend, labels, ttl in Election.objects.filter(
            name__in=list(wanted)
        ).values_list("pk", "name", "backend", "labels", "ttl")
    }
    new = [n for n in sorted(wanted) if n not in known]
    if new:
        Election.objects.bulk_create(
            [
                Election(
                    name=n, backend=wanted[n].backend, labels=wanted[n].labels, ttl=wanted[n].ttl
                )
                for n in new
            ],
            ignore_conflicts=True,
        )
        known.update(
            (name, (pk, backend, labels, ttl))
            for pk, name, backend, labels, ttl in Election.objects.filter(name__in=new).values_list(
                "pk", "name", "backend", "labels", "ttl"
            )
        )
    stale = sorted(
        (known[n][0], info.backend, info.labels, info.ttl)
        for n, info in wanted.items()
        if known[n][1:] != (info.backend, info.labels, info.ttl)
    )
    if stale:  # lock in id order, like ingest, before rewriting what the agent now says
        list(statuses.locked(pk for pk, *_ in stale).values_list("pk"))
        update_from_values(Election, ["id"], ["backend", "labels", "ttl"], stale)
    Membership.objects.bulk_create(
        [Membership(agent=agent, election_id=known[n][0]) for n in sorted(wanted)],
        ignore_conflicts=True,
    )
    ids = set(Membership.objects.filter(agent=agent).values_list("election_id", flat=True))
    statuses.refresh(ids)  # the agent is back: its claims count again
    elections_changed(ids)
    return Session(agent.last_seq, heartbeats.members_of(agent.pk))


@transaction.atomic
def agent_disconnected(agent_id: str, session: str | None = None) -> None:
    """The agent's socket closed. With ``session``, only if that socket still speaks for it
    (the agent may already have reconnected, maybe to another server process)."""
    agents = Agent.objects.filter(pk=agent_id)
    if session is not None:
        agents = agents.filter(session=session)
    if not agents.update(connected=False, session="", last_seen=timezone.now()):
        return
    ids = list(Membership.objects.filter(agent_id=agent_id).values_list("election_id", flat=True))
    statuses.refresh(ids)
    elections_changed(ids)


def ingest_events(agent_id: str, events: Sequence[protocol.Event]) -> IngestResult:
    """Store one agent's transitions (see ``elections.ingest``; the consumer batches frames)."""
    [result] = ingest_frames([Frame(agent_id, events)])
    return result


record_heartbeat = heartbeats.record_heartbeat


# -- periodic work ------------------------------------------------------------------------


@transaction.atomic
def mark_stale_agents(stale_after: float) -> list[str]:
    """Agents silent for ``stale_after`` seconds are offline (their socket died unseen)."""
    cutoff = timezone.now() - timedelta(seconds=stale_after)
    stale = sorted(
        Agent.objects.filter(connected=True, last_seen__lt=cutoff).values_list("pk", flat=True)
    )
    if stale:
        Agent.objects.filter(pk__in=stale, last_seen__lt=cutoff).update(connected=False)
        ids = set(
            Membership.objects.filter(agent_id__in=stale).values_list("election_id", flat=True)
        )
        statuses.refresh(ids)
        elections_changed(ids)
    return stale


def refresh_all_statuses(chunk: int = 1000) -> int:
    """Re-derive every election's status, a chunk of rows locked at a time."""
    changed: list[int] = []
    ids = list(Election.objects.order_by("pk").values_list("pk", flat=True))
    for start in range(0, len(ids), chunk):
        with transaction.atomic():
            flipped = statuses.refresh(ids[start : start + chunk])
            elections_changed(flipped)
        changed += flipped
    return len(changed)


def prune_history(before: datetime, *, batch: int = 5000) -> int:
    """Delete transitions received before ``before``, a batch per transaction (short locks,
    bounded memory); returns how many went. Terms, commands and the audit log stay."""
    deleted = 0
    while True:
        with transaction.atomic():
            ids = list(
                Transition.objects.filter(received__lt=before)
                .order_by("pk")
                .values_list("pk", flat=True)[:batch]
            )
            if not ids:
                return deleted
            deleted += Transition.objects.filter(pk__in=ids).delete()[0]
