"""Periodic work. Each task is also reachable without a broker: ``manage.py sweep``."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from elections import actions


@shared_task
def sweep_stale_agents() -> list[str]:
    return actions.mark_stale_agents(settings.ELECTORATE_AGENT_STALE_AFTER)


@shared_task
def refresh_statuses() -> int:
    return actions.refresh_all_statuses()


def sweep() -> dict[str, object]:
    """Everything periodic, in order; what the ticker and the management command run."""
    return {"stale_agents": sweep_stale_agents(), "statuses_changed": refresh_statuses()}
