"""Delivering a webhook's outbox: batched, signed POSTs, one drainer at a time.

A drainer first takes the webhook's lease (a compare-and-set on ``busy_until`` and
``lease_owner``: no database lock is held across an HTTP request), then sends the pending
events in id order, up to ``ELECTORATE_WEBHOOK_BATCH`` a request, and marks them delivered.
It stops after a batch that was not full: whatever arrives later waits for the next kick,
so a trickle of changes is still coalesced into one request per window. A failure keeps the
events pending and holds the lease until the backoff ends (``ELECTORATE_WEBHOOK_BACKOFF``
doubling per failure, capped at ``ELECTORATE_WEBHOOK_BACKOFF_CAP``).

Each request is signed: ``X-Electorate-Timestamp`` (Unix seconds) and
``X-Electorate-Signature: sha256=<hex>``, the HMAC-SHA256 with the webhook's secret of
``<timestamp>.<raw body>``. Redirects are never followed; only http(s) URLs are called.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from elections import webhooks
from elections.models import Webhook, WebhookDelivery, WebhookEvent
from elections.serializers import iso

SIGNATURE_HEADER = "X-Electorate-Signature"
TIMESTAMP_HEADER = "X-Electorate-Timestamp"
#: Receivers should refuse a timestamp further than this from their clock (replays).
TOLERANCE = 300
#: Bytes of a refusing receiver's answer kept with the delivery.
ANSWER_KEPT = 200


def signature(secret: str, timestamp: int | str, body: bytes) -> str:
    """The ``X-Electorate-Signature`` value of a request."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, header: str, now: float | None = None) -> bool:
    """What a receiver checks: the signature over the raw body, and a fresh timestamp."""
    try:
        age = abs((now if now is not None else time.time()) - int(timestamp))
    except ValueError:
        return False
    return age <= TOLERANCE and hmac.compare_digest(signature(secret, timestamp, body), header)


@dataclass(frozen=True)
class Outcome:
    """What one drain did: requests sent, events delivered, and the backoff if it failed."""

    posts: int = 0
    delivered: int = 0
    busy: bool = False
    retry_in: float | None = None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # the 3xx answer comes back as an HTTPError: recorded, not followed


_opener = urllib.request.build_opener(_NoRedirects)


def backoff(failures: int) -> float:
    """Seconds before the next try after ``failures`` failures in a row."""
    base = settings.ELECTORATE_WEBHOOK_BACKOFF
    return float(min(base * 2 ** max(failures - 1, 0), settings.ELECTORATE_WEBHOOK_BACKOFF_CAP))


def _lease() -> timedelta:
    return timedelta(seconds=2 * settings.ELECTORATE_WEBHOOK_TIMEOUT + 10)


def claim(webhook_id: int, owner: str) -> bool:
    """Take the webhook's lease: free, run out, or already ours (a retry of the same task)."""
    now = timezone.now()
    return bool(
        Webhook.objects.filter(pk=webhook_id, enabled=True)
        .filter(Q(busy_until__isnull=True) | Q(busy_until__lt=now) | Q(lease_owner=owner))
        .update(busy_until=now + _lease(), lease_owner=owner)
    )


def drain(webhook_id: int, owner: str) -> Outcome:
    """Send what is pending for one webhook, if nobody else is; see the module's docstring."""
    # A task starting now covers every event committed so far: the next one may kick again.
    Webhook.objects.filter(pk=webhook_id).update(kicked_at=None)
    if not claim(webhook_id, owner):
        return Outcome(busy=True)
    posts = delivered = 0
    batch_size = settings.ELECTORATE_WEBHOOK_BATCH
    while True:
        webhook = Webhook.objects.filter(pk=webhook_id, lease_owner=owner).first()
        if webhook is None:
            return Outcome(posts, delivered)  # lost the lease (disabled, or timed out)
        events = list(
            WebhookEvent.objects.filter(webhook_id=webhook_id, delivery__isnull=True).order_by(
                "id"
            )[:batch_size]
        )
        if not events:
            break
        posts += 1
        delivery = post(webhook, events)
        if not delivery.ok:
            wait = backoff(webhook.failures + 1)
            Webhook.objects.filter(pk=webhook_id, lease_owner=owner).update(
                failures=webhook.failures + 1,
                busy_until=timezone.now() + timedelta(seconds=wait),
            )
            return Outcome(posts, delivered, retry_in=wait)
        delivered += len(events)
        Webhook.objects.filter(pk=webhook_id, lease_owner=owner).update(
            failures=0, busy_until=timezone.now() + _lease()
        )
        if len(events) < batch_size:
            break  # later events wait for their own kick: one request per window
    Webhook.objects.filter(pk=webhook_id, lease_owner=owner).update(busy_until=None, lease_owner="")
    # Events committed after the last read whose kick found us busy: kick for them now.
    pending = WebhookEvent.objects.filter(webhook_id=webhook_id, delivery__isnull=True)
    if not webhooks.eager() and pending.exists():
        webhooks.kick([webhook_id])
    return Outcome(posts, delivered)


def body(webhook: Webhook, events: list[WebhookEvent]) -> bytes:
    return json.dumps(
        {
            "webhook": webhook.name,
            "events": [
                {
                    "id": e.pk,
                    "kind": e.kind,
                    "election": e.election,
                    "at": iso(e.at),
                    "detail": e.detail,
                }
                for e in events
            ],
        },
        cls=DjangoJSONEncoder,
        separators=(",", ":"),
    ).encode()


def post(webhook: Webhook, events: list[WebhookEvent]) -> WebhookDelivery:
    """One signed POST of ``events``; the outcome is stored, and on success the events are
    marked delivered by it (in one transaction)."""
    started, clock = timezone.now(), time.monotonic()
    status, error = _send(webhook, body(webhook, events))
    ok = status is not None and 200 <= status < 300
    with transaction.atomic():
        delivery = WebhookDelivery.objects.create(
            webhook=webhook,
            at=started,
            ok=ok,
            status_code=status,
            error=error[:500],
            attempt=webhook.failures + 1,
            events=len(events),
            duration=time.monotonic() - clock,
        )
        if ok:
            WebhookEvent.objects.filter(pk__in=[e.pk for e in events]).update(delivery=delivery)
    return delivery


def _send(webhook: Webhook, payload: bytes) -> tuple[int | None, str]:
    """POST ``payload``: the status code (None: no answer) and what went wrong, if anything."""
    if urlsplit(webhook.url).scheme not in ("http", "https"):
        return None, "refused: only http:// and https:// URLs are called"
    timestamp = str(int(time.time()))
    request = urllib.request.Request(
        webhook.url,
        data=payload,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "Electorate-Webhook/1",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: signature(webhook.secret, timestamp, payload),
        },
    )
    try:
        with _opener.open(request, timeout=settings.ELECTORATE_WEBHOOK_TIMEOUT) as answer:
            return answer.status, ""
    except urllib.error.HTTPError as refused:
        if 300 <= refused.code < 400:
            where = refused.headers.get("Location", "?")
            return refused.code, f"redirected to {where}: not followed"
        text = refused.read(ANSWER_KEPT).decode("utf-8", "replace")
        return refused.code, f"HTTP {refused.code}: {text}".strip()
    except (urllib.error.URLError, OSError, ValueError) as failed:
        reason = getattr(failed, "reason", failed)
        return None, f"{type(failed).__name__}: {reason}"
