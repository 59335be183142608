"""Memberships and elections nobody speaks for any more: zombies and orphans.

A *zombie* is a membership whose agent is connected but has stopped listing the election in
its heartbeats (its config dropped it; hellos only ever add memberships). Heartbeats note
``Membership.reported`` in the statement that already writes the lease, so detecting one
costs no write of its own: a connected agent's membership not reported for
``ELECTORATE_AGENT_STALE_AFTER`` seconds, once the agent has been connected that long.

An *orphan* is an election no member has reported for ``ELECTORATE_ORPHAN_AFTER`` seconds
(default a day); one never reported counts from its last change.

Both are one SQL condition each, so the agents pages count them for a whole page of rows in
one query, and the forget actions check them with the same definition.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import BooleanField, DateTimeField, ExpressionWrapper, F, Max, Q, QuerySet
from django.db.models.functions import Coalesce
from django.utils import timezone

from elections.models import Election, Membership


def grace() -> timedelta:
    return timedelta(seconds=settings.ELECTORATE_AGENT_STALE_AFTER)


def zombie_q(now: datetime, member: str = "", agent: str = "agent__") -> Q:
    """Zombie memberships, written from ``Membership`` (defaults) or through a relation
    (e.g. ``member="memberships__", agent=""`` from ``Agent``)."""
    cutoff = now - grace()
    return Q(
        **{f"{agent}connected": True, f"{agent}connected_at__lt": cutoff},
    ) & (Q(**{f"{member}reported__isnull": True}) | Q(**{f"{member}reported__lt": cutoff}))


def with_zombie_flag(memberships: QuerySet[Membership], now: datetime) -> QuerySet[Membership]:
    """Each membership with ``zombie`` (bool), computed in the query."""
    return memberships.annotate(
        zombie=ExpressionWrapper(zombie_q(now), output_field=BooleanField())
    )


def is_zombie(membership_id: int, now: datetime | None = None) -> bool:
    return Membership.objects.filter(zombie_q(now or timezone.now()), pk=membership_id).exists()


def orphan_cutoff(now: datetime) -> datetime:
    return now - timedelta(seconds=settings.ELECTORATE_ORPHAN_AFTER)


def orphans(now: datetime | None = None) -> QuerySet[Election]:
    """Elections nobody has reported for the orphan period, oldest report first; each with
    ``last_report`` (the newest member's report, or the election's last change)."""
    cutoff = orphan_cutoff(now or timezone.now())
    return (
        Election.objects.annotate(
            last_report=Coalesce(
                Max("memberships__reported"), F("updated"), output_field=DateTimeField()
            )
        )
        .filter(last_report__lt=cutoff)
        .order_by("last_report", "name")
    )
