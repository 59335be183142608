"""Failover gaps: how long each leader change left an election without a provable leader,
and an election's gaps over a window, held against its TTL and recovery-time objective.

A term's gap (``Term.gap``, seconds) is measured when the term opens (``elections.terms``),
from the previous term's *last proven lease* to the new leader's win:

- the previous term's end, when its own leader reported leaving it (resigned, forced,
  expired, lost): an agent demotes itself before its lease can lapse, so its report is the
  last moment its lease was proven;
- otherwise (its leader never said so; the term ends only because a newer token was seen,
  ``superseded`` or ``agent-offline``) the previous leader's last known lease expiry
  (``Membership.lease_expires``, from its heartbeats), never earlier than that term's start;
  its lease may really have been renewed after its last heartbeat, so such a gap is an upper
  bound, by at most one heartbeat interval;
- the previous leader's own report of leaving, arriving after the new win, replaces a gap
  measured from its lease (better evidence), as long as that term's successor is among the
  terms its batch loads (the usual case: the election's current term).

A new leader winning before the last proven lease ran out (the backend ended the lease early;
the agents' clocks overlapping) has a gap of 0. With nothing to measure from (an election's
first term, no lease ever reported, a term learned late, after its successor) the gap is
None. Wins and reports carry the agents' clocks, lease expiries the dashboard's (heartbeat
arrival plus the lease left), so clock skew between them shows in lease-measured gaps.

``stats_for`` gives each election's gaps over ``ELECTORATE_GAP_WINDOW`` (last, worst, p50,
p99, how many exceed the TTL and the RTO) with one query for any number of elections.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from elections.models import Election, Term
from protocol import EndReason

#: End reasons a leader reports itself: its term's end is its last proven lease.
SELF_ENDED = frozenset({EndReason.RESIGNED, EndReason.FORCED, EndReason.EXPIRED, EndReason.LOST})
#: End reasons of a term ended by someone else's win: its leader never said when it left.
ENDED_BY_SUCCESSOR = frozenset({EndReason.SUPERSEDED, EndReason.AGENT_OFFLINE})


def last_proven(previous: Term, lease_expires: datetime | None) -> datetime | None:
    """When the previous term's lease was last proven, or None when nothing proves it."""
    if previous.ended is not None and previous.end_reason in SELF_ENDED:
        return previous.ended
    if lease_expires is None:
        return None
    return max(lease_expires, previous.started)


def gap(since: datetime | None, won: datetime) -> float | None:
    """Seconds from ``since`` to ``won``; an overlap counts as 0."""
    return None if since is None else max(0.0, (won - since).total_seconds())


# -- statistics ----------------------------------------------------------------------------

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_rto(text: object) -> float | None:
    """An ``rto`` label: seconds, or a number with ms/s/m/h; None when it is not one."""
    match = _DURATION.fullmatch(str(text)) if text is not None else None
    if not match:
        return None
    value = float(match[1]) * _UNIT[match[2]]
    return value if value > 0 else None


def rto_of(election: Election) -> tuple[float | None, str]:
    """The election's recovery-time objective and where it comes from (label, setting)."""
    labels = election.labels if isinstance(election.labels, dict) else {}
    labelled = parse_rto(labels.get("rto"))
    if labelled is not None:
        return labelled, "label"
    if settings.ELECTORATE_RTO:
        return float(settings.ELECTORATE_RTO), "setting"
    return None, ""


def percentile(ordered: Sequence[float], p: float) -> float | None:
    """Nearest rank: the smallest value with at least ``p``% of the values at or below it."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass(frozen=True)
class GapStats:
    """One election's failover gaps over the window."""

    window: float
    #: Leader changes (terms started) in the window, and those with no measurable gap.
    changes: int
    unknown: int
    last: float | None
    last_at: datetime | None
    worst: float | None
    p50: float | None
    p99: float | None
    ttl: float
    rto: float | None
    rto_source: str
    over_ttl: int
    over_rto: int

    def as_json(self) -> dict[str, object]:
        return {
            "window_seconds": self.window,
            "changes": self.changes,
            "unknown": self.unknown,
            "last": self.last,
            "last_at": self.last_at.isoformat() if self.last_at else None,
            "worst": self.worst,
            "p50": self.p50,
            "p99": self.p99,
            "ttl": self.ttl,
            "rto": self.rto,
            "rto_source": self.rto_source or None,
            "over_ttl": self.over_ttl,
            "over_rto": self.over_rto,
        }


def stats_for(
    elections: Sequence[Election], now: datetime | None = None, window: float | None = None
) -> dict[int, GapStats]:
    """Each election's gap statistics over the window (default ``ELECTORATE_GAP_WINDOW``);
    one query, whatever the number of elections."""
    window = settings.ELECTORATE_GAP_WINDOW if window is None else window
    since = (now or timezone.now()) - timedelta(seconds=window)
    terms: dict[int, list[tuple[datetime, float | None]]] = {e.pk: [] for e in elections}
    if terms:
        for election_id, started, value in (
            Term.objects.filter(election_id__in=list(terms), started__gte=since)
            .order_by("started", "token")
            .values_list("election_id", "started", "gap")
        ):
            terms[election_id].append((started, value))
    return {e.pk: _stats(e, terms[e.pk], window) for e in elections}


def stats(election: Election, now: datetime | None = None) -> GapStats:
    """One election's gap statistics (one query)."""
    return stats_for([election], now)[election.pk]


def _stats(
    election: Election, rows: list[tuple[datetime, float | None]], window: float
) -> GapStats:
    known = [(started, value) for started, value in rows if value is not None]
    ordered = sorted(value for _, value in known)
    rto, source = rto_of(election)
    return GapStats(
        window=window,
        changes=len(rows),
        unknown=len(rows) - len(known),
        last=known[-1][1] if known else None,
        last_at=known[-1][0] if known else None,
        worst=ordered[-1] if ordered else None,
        p50=percentile(ordered, 50),
        p99=percentile(ordered, 99),
        ttl=election.ttl,
        rto=rto,
        rto_source=source,
        over_ttl=sum(1 for value in ordered if value > election.ttl),
        over_rto=sum(1 for value in ordered if rto is not None and value > rto),
    )
