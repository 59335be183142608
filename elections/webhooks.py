"""Alerts out: events into each webhook's outbox, and a delivery task kicked once per burst.

Every event enters through ``notify`` (or ``notify_many`` for a batch), called inside the
transaction of the change it reports: it appends one row per interested webhook to the
outbox (``WebhookEvent``) with one statement, so the event exists exactly when the change
committed. On commit the webhooks concerned are *kicked*: a compare-and-set on
``Webhook.kicked_at`` lets only the first change of a burst queue a delivery task (after
``ELECTORATE_WEBHOOK_COALESCE`` seconds); the task drains everything pending into batched
POSTs (``elections.webhook_delivery``). A burst of 1,000 changes therefore costs a webhook a
few requests, not 1,000.

Without a broker (embedded mode) nothing is queued on commit: the ticker's
``deliver_webhooks`` drains the outboxes every second, off the request path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from elections.models import Election, Webhook, WebhookDelivery, WebhookEvent

log = logging.getLogger(__name__)

Kind = Webhook.Kind
#: The kinds by their names in code: ``notify(webhooks.FLAPPING, ...)``.
LEADER_CHANGE, LEADERLESS, SPLIT_BRAIN, FLAPPING, COMMAND = (
    Kind.LEADER_CHANGE,
    Kind.LEADERLESS,
    Kind.SPLIT_BRAIN,
    Kind.FLAPPING,
    Kind.COMMAND,
)

#: A kick older than this whose task never started (a lost message) no longer holds back
#: the next one.
KICK_STALE = timedelta(seconds=60)


@dataclass(frozen=True)
class Event:
    kind: str
    election: str
    detail: dict[str, Any] = field(default_factory=dict)
    #: When it happened (default: now).
    at: datetime | None = None
    #: Leaderless events only: the spell they report (sent once per spell and webhook).
    spell: datetime | None = None


def notify(
    kind: str, election: str, detail: dict[str, Any] | None = None, *, at: datetime | None = None
) -> int:
    """Queue one event for every enabled webhook that wants ``kind``; see ``notify_many``."""
    return notify_many([Event(kind, election, detail or {}, at)])


def notify_many(events: Iterable[Event]) -> int:
    """Queue events for every enabled webhook that wants their kind: two statements, however
    many events (one to read the webhooks, one insert). Call it inside the transaction of the
    change; delivery starts after it commits. Returns the outbox rows written."""
    items = list(events)
    if not items:
        return 0
    wanted = _subscribers({e.kind for e in items})
    if not wanted:
        return 0
    now = timezone.now()
    rows = [
        WebhookEvent(
            webhook_id=pk,
            kind=e.kind,
            election=e.election[:200],
            at=e.at or now,
            detail=e.detail,
            spell=e.spell,
        )
        for e in items
        for pk in wanted.get(e.kind, ())
    ]
    WebhookEvent.objects.bulk_create(rows, ignore_conflicts=any(e.spell for e in items))
    kick_on_commit({row.webhook_id for row in rows})
    return len(rows)


def send_test(webhook_ids: Iterable[int], by: str) -> int:
    """A ``test`` event for each enabled webhook, whatever kinds it asked for."""
    ids = list(Webhook.objects.filter(pk__in=list(webhook_ids), enabled=True).values_list("pk"))
    with transaction.atomic():
        WebhookEvent.objects.bulk_create(
            WebhookEvent(webhook_id=pk, kind=Kind.TEST, election="", detail={"by": by})
            for (pk,) in ids
        )
        kick_on_commit(pk for (pk,) in ids)
    return len(ids)


def _subscribers(kinds: set[str]) -> dict[str, list[int]]:
    """Enabled webhooks by the kinds asked for (the table holds a handful of rows)."""
    found: dict[str, list[int]] = {}
    for pk, wants in Webhook.objects.filter(enabled=True).values_list("pk", "events"):
        for kind in kinds.intersection(wants or ()):
            found.setdefault(kind, []).append(pk)
    return found


# -- kicking a delivery -----------------------------------------------------------------


def eager() -> bool:
    """No broker: tasks would run in the caller's thread (the ticker drains instead)."""
    from dashboard.celery import app

    return bool(app.conf.task_always_eager)


def kick_on_commit(webhook_ids: Iterable[int]) -> None:
    ids = sorted(set(webhook_ids))
    if ids and not eager():
        # robust: a broker that is away must not fail the change that already committed.
        transaction.on_commit(lambda: kick(ids), robust=True)


def kick(webhook_ids: Sequence[int]) -> list[int]:
    """Queue a delivery task for each webhook that has none queued yet; returns those queued.

    One statement claims them all: only the first kick of a burst sets ``kicked_at`` (or one
    whose task was lost long ago), so concurrent commits queue one task, not one each.
    """
    if not webhook_ids:
        return []
    now = timezone.now()
    table = connection.ops.quote_name(Webhook._meta.db_table)
    marks = ", ".join(["%s"] * len(webhook_ids))
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET kicked_at = %s WHERE id IN ({marks}) AND enabled "
            f"AND (kicked_at IS NULL OR kicked_at < %s) RETURNING id",
            [now, *webhook_ids, now - KICK_STALE],
        )
        claimed = sorted(row[0] for row in cursor.fetchall())
    from elections.tasks import deliver_webhook

    for pk in claimed:
        try:
            # retry=False: fail at once rather than hold the committing thread; the sweep
            # (deliver_webhooks) queues it again once the broker answers.
            deliver_webhook.apply_async(
                (pk,), countdown=settings.ELECTORATE_WEBHOOK_COALESCE, retry=False
            )
        except Exception:
            Webhook.objects.filter(pk=pk, kicked_at=now).update(kicked_at=None)
            log.warning("could not queue the delivery of webhook %s", pk, exc_info=True)
    return claimed


def due(now: datetime | None = None) -> list[int]:
    """Enabled webhooks with pending events and nobody draining them (nor backing off)."""
    now = now or timezone.now()
    pending = WebhookEvent.objects.filter(webhook=OuterRef("pk"), delivery__isnull=True)
    return list(
        Webhook.objects.filter(enabled=True)
        .filter(Q(busy_until__isnull=True) | Q(busy_until__lt=now))
        .filter(Exists(pending))
        .values_list("pk", flat=True)
    )


# -- leaderless longer than a webhook's threshold ----------------------------------------


def queue_leaderless(now: datetime | None = None) -> int:
    """Queue a leaderless event for each election leaderless longer than a webhook's
    threshold, once per leaderless spell (``leaderless_since`` names the spell)."""
    now = now or timezone.now()
    events = 0
    for webhook in Webhook.objects.filter(enabled=True).only("pk", "events", "leaderless_after"):
        if LEADERLESS not in (webhook.events or ()):
            continue
        sent = WebhookEvent.objects.filter(
            webhook=webhook,
            election=OuterRef("name"),
            spell=OuterRef("leaderless_since"),
        )
        spells = (
            Election.objects.filter(
                status=Election.Status.LEADERLESS,
                leaderless_since__lte=now - timedelta(seconds=webhook.leaderless_after),
            )
            .exclude(Exists(sent))
            .values_list("name", "leaderless_since", "backend", "paused")
        )
        rows = [
            WebhookEvent(
                webhook_id=webhook.pk,
                kind=LEADERLESS,
                election=name,
                at=now,
                spell=since,
                detail={
                    "since": since.isoformat(),
                    "seconds": round((now - since).total_seconds(), 1),
                    "threshold": webhook.leaderless_after,
                    "backend": backend,
                    "paused": paused,
                },
            )
            for name, since, backend, paused in spells
        ]
        if rows:
            with transaction.atomic():
                WebhookEvent.objects.bulk_create(rows, ignore_conflicts=True)
                kick_on_commit([webhook.pk])
            events += len(rows)
    return events


def prune(before: datetime) -> int:
    """Forget deliveries (and the events they carried) older than ``before``."""
    return WebhookDelivery.objects.filter(at__lt=before).delete()[0]
