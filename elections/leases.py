"""Lease health: is a leader renewing its lease in time?

A leader renews every third of its TTL by default (``renew_interval`` in the agents'
backends; PostgreSQL's ``check_interval`` may be up to half of it), so a healthy leader's
heartbeat reports at least half of the TTL left, two thirds by default. A heartbeat that
claims the seat with less than ``LATE_FRACTION`` of the TTL left means renewals are being
missed: the lease is about to lapse and the election is *lease-late* (shown before the seat
is lost and the election goes leaderless).

Judged on what the agent reported, not on the dashboard's clock: heartbeats come every few
seconds, so a 1 s lease the dashboard last heard of has always run out between two of them.
"""

from __future__ import annotations

from datetime import datetime, timedelta

#: A leader reporting less than this share of its TTL left has missed renewals.
LATE_FRACTION = 1 / 3


def late(claims: bool, ttl_left: float | None, ttl: float) -> bool:
    """Whether a heartbeat's view of one election says its lease is about to lapse."""
    return claims and ttl_left is not None and ttl > 0 and ttl_left < ttl * LATE_FRACTION


def renewed_at(expires: datetime | None, ttl: float) -> datetime | None:
    """When the lease was last renewed, assuming a renewal grants the whole TTL."""
    return expires - timedelta(seconds=ttl) if expires is not None else None
