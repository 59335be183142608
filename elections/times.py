"""Times typed by people: a scheduled switchover from a form, the CLI or the API."""

from __future__ import annotations

from datetime import UTC, datetime

from django.utils import timezone


def aware(when: datetime) -> datetime:
    """A time without a zone is read as UTC (the dashboard shows and takes UTC)."""
    return timezone.make_aware(when, UTC) if timezone.is_naive(when) else when


def parse_when(text: str) -> datetime | None:
    """A scheduled time from a datetime-local input (UTC) or ISO 8601 text; None when empty.
    Raises ValueError for text that is not a time."""
    text = text.strip()
    return aware(datetime.fromisoformat(text)) if text else None
