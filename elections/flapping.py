"""Flapping: an election whose leader changes too often to be trusted.

An election flaps while *more than* ``ELECTORATE_FLAP_CHANGES`` terms started within the last
``ELECTORATE_FLAP_WINDOW`` seconds: by default more than 3 in 5 minutes, PD's damper, so the
fourth change within five minutes flags it and three do not. A change is a new term (a new
fencing token), the same leader winning again included: a seat that bounces is news whoever
lands on it. The window is counted back from now on the dashboard's clock over the terms'
start times (the agents' clocks), so a burst replayed late from a spool flags nothing.

It is judged set-based where terms open (``elections.terms``, one query per batch) and clears
by itself once the window holds no more than the threshold: at the next batch touching the
election, or at the latest by ``settle`` (a periodic task, ``elections.tasks``). Starting and
clearing are audited (``flapping``, ``flapping-cleared``) and announced on commit, so the map
redraws the row.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from elections import audit, statuses, webhooks
from elections.broadcast import elections_changed
from elections.models import Election, Term
from elections.sql import update_from_values


def threshold() -> int:
    """An election flaps with more than this many changes in the window."""
    return int(settings.ELECTORATE_FLAP_CHANGES)


def window() -> float:
    return float(settings.ELECTORATE_FLAP_WINDOW)


def counts(election_ids: Iterable[int], now: datetime) -> dict[int, int]:
    """Terms started in the window, per election (one query; zero counts left out)."""
    ids = sorted(set(election_ids))
    if not ids:
        return {}
    since = now - timedelta(seconds=window())
    return dict(
        Term.objects.filter(election_id__in=ids, started__gt=since, started__lte=now)
        .values("election_id")
        .annotate(n=Count("pk"))
        .order_by()
        .values_list("election_id", "n")
    )


@dataclass
class Flips:
    """Elections that started or stopped flapping in one judgement, with their counts."""

    started: list[Election] = field(default_factory=list)
    cleared: list[Election] = field(default_factory=list)
    #: The flapping_since each cleared election had.
    was_since: dict[int, datetime] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)

    @property
    def ids(self) -> set[int]:
        return {e.pk for e in (*self.started, *self.cleared)}

    def details(self) -> list[tuple[str, str, dict[str, object]]]:
        """(action, election, detail) of each flip: what the audit log and alerts say."""
        rule = {"threshold": threshold(), "window_seconds": window()}
        started = [
            (audit.Action.FLAPPING, e.name, {"changes": self.counts.get(e.pk, 0), **rule})
            for e in self.started
        ]
        cleared = [
            (
                audit.Action.FLAPPING_CLEARED,
                e.name,
                {
                    "changes": self.counts.get(e.pk, 0),
                    "flapping_since": self.was_since[e.pk].isoformat(),
                    **rule,
                },
            )
            for e in self.cleared
        ]
        return started + cleared

    def alerts(self) -> list[webhooks.Event]:
        """The webhook events of these flips: one ``flapping`` kind, started or cleared."""
        return [
            webhooks.Event(
                webhooks.FLAPPING, name, {"flapping": action == audit.Action.FLAPPING, **detail}
            )
            for action, name, detail in self.details()
        ]

    def audit(self) -> list[audit.Pending]:
        """The audit entries of these flips (``flapping``, ``flapping-cleared``)."""
        return [
            audit.Pending(audit.Actor.SYSTEM, "system", action, name, detail)
            for action, name, detail in self.details()
        ]


def judge(elections: Iterable[Election], now: datetime) -> Flips:
    """Set ``flapping_since`` of the given (locked) elections from their terms in the window,
    in memory; the caller writes them and ``Flips.audit()``. One query, none for no elections.
    """
    items = list(elections)
    flips = Flips(counts=counts((e.pk for e in items), now))
    for election in items:
        flaps = flips.counts.get(election.pk, 0) > threshold()
        if flaps and election.flapping_since is None:
            election.flapping_since = now
            flips.started.append(election)
        elif not flaps and election.flapping_since is not None:
            flips.was_since[election.pk] = election.flapping_since
            election.flapping_since = None
            flips.cleared.append(election)
    return flips


@transaction.atomic
def settle(now: datetime | None = None) -> list[int]:
    """Re-judge every flapping election (the periodic clearing); returns the ids that flipped.

    A constant number of statements: lock the flapping elections, count, write, audit.
    """
    now = now or timezone.now()
    flapping = list(
        statuses.locked(
            Election.objects.filter(flapping_since__isnull=False).values_list("pk", flat=True)
        ).only("pk", "name", "flapping_since")
    )
    flips = judge(flapping, now)
    update_from_values(
        Election,
        ["id"],
        ["flapping_since", "updated"],
        [(e.pk, e.flapping_since, now) for e in (*flips.started, *flips.cleared)],
    )
    webhooks.notify_many(flips.alerts())
    audit.record_many(flips.audit())
    elections_changed(flips.ids)
    return sorted(flips.ids)
