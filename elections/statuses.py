"""An election's status, derived from its members for many elections at once.

- ``split-brain``: more than one connected agent reports, in its heartbeat, a leader lease
  that has not run out yet. Events alone are not enough: the old leader's "stepped down" may
  simply arrive after the new leader's "won".
- ``leaderless``: no leader is recorded and nobody claims the seat.
- ``led``: otherwise. Whether the leader's agent is connected (*unverified* when not) is read
  at display time, from the agent row.

Callers hold the elections' row locks (``select_for_update`` in id order), so two
transactions never derive a status from each other's half-written members.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable
from datetime import datetime

from django.db.models import QuerySet
from django.utils import timezone

from elections import webhooks
from elections.models import Election, Membership
from elections.sql import update_from_values

LED, LEADERLESS, SPLIT_BRAIN = (
    Election.Status.LED,
    Election.Status.LEADERLESS,
    Election.Status.SPLIT_BRAIN,
)


def status_of(leader_id: str | None, claimants: Collection[str]) -> str:
    if len(claimants) > 1:
        return SPLIT_BRAIN
    if leader_id is None and not claimants:
        return LEADERLESS
    return LED


def claimants(election_ids: Iterable[int], now: datetime) -> dict[int, set[str]]:
    """Connected agents holding an unexpired leader lease, per election (one query)."""
    found: dict[int, set[str]] = defaultdict(set)
    rows = Membership.objects.filter(
        election_id__in=list(election_ids),
        state=Membership.State.LEADER,
        agent__connected=True,
        lease_expires__gt=now,
    ).values_list("election_id", "agent_id")
    for election_id, agent_id in rows:
        found[election_id].add(agent_id)
    return found


def locked(election_ids: Iterable[int]) -> QuerySet[Election]:
    """The elections, row-locked in id order (a fixed order cannot deadlock)."""
    return Election.objects.select_for_update().filter(pk__in=list(election_ids)).order_by("pk")


def derive(elections: Iterable[Election], now: datetime) -> list[Election]:
    """Set ``status`` (and start the leaderless clock) of locked ``elections`` from their
    members, in memory; return those that changed. One query, whatever their number, and
    a webhook alert (``elections.webhooks``) for each split brain that begins."""
    items = list(elections)
    found = claimants((e.pk for e in items), now)
    changed = []
    alerts: list[webhooks.Event] = []
    for election in items:
        status = status_of(election.leader_id, found.get(election.pk, ()))
        since = election.leaderless_since
        if status == LEADERLESS and since is None:
            since = now  # new elections start leaderless: the clock starts when first seen
        if status == SPLIT_BRAIN and election.status != SPLIT_BRAIN:
            alerts.append(
                webhooks.Event(
                    webhooks.SPLIT_BRAIN,
                    election.name,
                    {"claimants": sorted(found[election.pk]), "leader": election.leader_id},
                    at=now,
                )
            )
        if (status, since) != (election.status, election.leaderless_since):
            election.status, election.leaderless_since = status, since
            changed.append(election)
    webhooks.notify_many(alerts)  # no statement unless a split brain began
    return changed


def apply(elections: Iterable[Election], now: datetime | None = None) -> list[int]:
    """Derive and write the status of locked ``elections``; return the ids that changed."""
    changed = derive(elections, now or timezone.now())
    update_from_values(
        Election,
        ["id"],
        ["status", "leaderless_since"],
        [(e.pk, e.status, e.leaderless_since) for e in changed],
    )
    return [e.pk for e in changed]


def refresh(election_ids: Iterable[int]) -> list[int]:
    """Lock and re-derive the given elections; returns the ids whose status changed."""
    return apply(locked(election_ids).only("pk", "name", "leader_id", "status", "leaderless_since"))
