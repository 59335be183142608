"""Periodic work. Celery beat runs it in production; the ticker thread in embedded mode; and
``manage.py sweep`` runs it once without a broker."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from celery import Task, shared_task
from django.conf import settings
from django.utils import timezone

from elections import actions, audit, commands, flapping, webhook_delivery, webhooks


@shared_task
def sweep_stale_agents() -> list[str]:
    return actions.mark_stale_agents(settings.ELECTORATE_AGENT_STALE_AFTER)


@shared_task
def refresh_statuses() -> int:
    return actions.refresh_all_statuses()


@shared_task
def run_scheduled_commands() -> list[int]:
    return commands.run_due()


@shared_task
def end_maintenance_windows() -> list[str]:
    return commands.end_windows()


@shared_task
def expire_commands() -> list[int]:
    return commands.expire()


@shared_task
def settle_flapping() -> list[int]:
    """Clear flapping once an election's window holds few enough changes again."""
    return flapping.settle()


_published: dict[str, str | None] = {"head": None}


@shared_task
def publish_audit_head() -> int | None:
    """The audit log's head to the log and the heads file: proof against deleting its end."""
    path = (
        Path(settings.ELECTORATE_AUDIT_HEAD_FILE) if settings.ELECTORATE_AUDIT_HEAD_FILE else None
    )
    current = audit.publish_head(path, _published["head"])
    _published["head"] = current[1] if current else None
    return current[0] if current else None


@shared_task
def prune_history() -> int:
    keep = timedelta(days=settings.ELECTORATE_RETENTION_DAYS)
    webhooks.prune(timezone.now() - keep)
    return actions.prune_history(timezone.now() - keep)


@shared_task(bind=True, max_retries=None)
def deliver_webhook(self: Task, webhook_id: int) -> int:
    """Drain one webhook's outbox (queued by ``webhooks.kick``); on failure retry after the
    backoff, holding the webhook's lease meanwhile so no other task jumps the queue."""
    outcome = webhook_delivery.drain(webhook_id, owner=self.request.id or "direct")
    retry = outcome.retry_in is not None and not self.request.is_eager
    if retry and self.request.retries < settings.ELECTORATE_WEBHOOK_RETRIES:
        raise self.retry(countdown=outcome.retry_in)
    # Out of retries, the events stay pending: the lease runs out with the backoff, then
    # deliver_webhooks starts over.
    return outcome.delivered


@shared_task
def deliver_webhooks() -> list[int]:
    """Webhooks with pending events and nobody on them: queued (with a broker) or drained
    right here (embedded mode: the ticker's thread, never a request's)."""
    if not webhooks.eager():
        return webhooks.kick(webhooks.due())
    for pk in webhooks.due():
        webhook_delivery.drain(pk, owner="ticker")
    return []


@shared_task
def alert_leaderless() -> int:
    return webhooks.queue_leaderless()


#: Every periodic task and its period in seconds: the one schedule beat and the ticker share.
PERIODIC = [
    (sweep_stale_agents, 5.0),
    (refresh_statuses, 30.0),
    (run_scheduled_commands, 1.0),
    (expire_commands, 2.0),
    (end_maintenance_windows, 5.0),
    (settle_flapping, 10.0),
    (prune_history, 3600.0),
    (publish_audit_head, 60.0),
    (alert_leaderless, 5.0),
    (deliver_webhooks, 1.0),
]


def sweep() -> dict[str, object]:
    """Everything periodic, once, in order."""
    return {task.name.rsplit(".", 1)[-1]: task() for task, _ in PERIODIC}
