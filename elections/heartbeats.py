"""Heartbeats: what each agent says of each of its elections, every few seconds.

Most heartbeats change nothing but time: the same state, leader and token as the last one,
with a renewed lease. Those cost no statement of their own: the agent's consumer compares
with what it last stored (``Members``) and hands the lease and the liveness to
``elections.liveness``, which writes every agent's in one go each second. A heartbeat that
does change a view is written at once (``write_views``), with the statuses it may flip.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

import protocol
from elections import leases, statuses, terms
from elections.broadcast import elections_changed
from elections.models import Agent, Membership
from elections.sql import update_from_values


@dataclass(frozen=True)
class View:
    """One election as one agent sees it."""

    state: str
    leader: str
    token: int | None


@dataclass
class Member:
    """A membership as the dashboard stored it (``view`` None: not known, write it)."""

    id: int
    election_id: int
    view: View | None
    #: The election's TTL, and whether the stored lease is late (``elections.leases``).
    ttl: float = 0.0
    late: bool = False


@dataclass(frozen=True)
class Row:
    """One membership to write: its view and its lease."""

    member_id: int
    election_id: int
    view: View
    lease_expires: datetime | None
    late: bool = False

    @property
    def claims(self) -> bool:
        return self.view.state == Membership.State.LEADER


def members_of(agent_id: str) -> dict[str, Member]:
    """Every membership of an agent, by election name (one query)."""
    return {
        name: Member(pk, election_id, View(state, leader, token), ttl, late)
        for pk, election_id, name, state, leader, token, ttl, late in Membership.objects.filter(
            agent_id=agent_id
        ).values_list(
            "pk",
            "election_id",
            "election__name",
            "state",
            "sees_leader",
            "sees_token",
            "election__ttl",
            "lease_late",
        )
    }


def rows(
    members: dict[str, Member], heartbeat: protocol.Heartbeat, now: datetime
) -> tuple[list[Row], list[Row]]:
    """Split a heartbeat into the rows whose view changed and the rows that only renew.

    A lease turning late (or healthy again) counts as a change: it is written at once and
    shown, while mere renewals wait for the liveness flush.
    Elections the agent reports but is not a member of are left out (a hello registers them).
    """
    changed, renewed = [], []
    for name, seen in heartbeat.states.items():
        member = members.get(name)
        if member is None:
            continue
        expires = now + timedelta(seconds=seen.ttl_left) if seen.ttl_left is not None else None
        view = View(seen.state, seen.leader or "", seen.token)
        late = leases.late(view.state == Membership.State.LEADER, seen.ttl_left, member.ttl)
        row = Row(member.id, member.election_id, view, expires, late)
        same = row.view == member.view and late == member.late
        (renewed if same else changed).append(row)
    return changed, renewed


@transaction.atomic
def write_views(agent_id: str, changed: list[Row], renewed: list[Row] = ()) -> list[int]:
    """Store changed views (and any renewed leases given); re-derive the statuses they touch.

    A renewed leader lease can reveal a split brain too, so claims count as touches.
    """
    now = timezone.now()
    update_from_values(
        Membership,
        ["id"],
        ["state", "sees_leader", "sees_token", "lease_expires", "lease_late", "reported"],
        [
            (r.member_id, r.view.state, r.view.leader, r.view.token, r.lease_expires, r.late, now)
            for r in changed
        ],
    )
    update_from_values(
        Membership,
        ["id"],
        ["lease_expires", "reported"],
        [(r.member_id, r.lease_expires, now) for r in renewed],
    )
    # A member that now sees a held claim's leader and token confirms it.
    views = {r.election_id for r in changed}
    confirmed = terms.confirm(views, now) if views else []
    touched = views | {r.election_id for r in renewed if r.claims}
    flipped = statuses.refresh(touched) if touched else []
    elections_changed(views | set(flipped) | set(confirmed))
    return flipped


def record_heartbeat(agent_id: str, heartbeat: protocol.Heartbeat) -> None:
    """Apply one heartbeat straight to the database (tests, replays; the consumer batches)."""
    changed, renewed = rows(members_of(agent_id), heartbeat, timezone.now())
    with transaction.atomic():
        Agent.objects.filter(pk=agent_id).update(last_seen=timezone.now(), connected=True)
        write_views(agent_id, changed, renewed)
