"""Times typed by people: a scheduled switchover or the end of a maintenance window, from a
form, the CLI or the API."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from django.utils import timezone


def aware(when: datetime) -> datetime:
    """A time without a zone is read as UTC (the dashboard shows and takes UTC)."""
    return timezone.make_aware(when, UTC) if timezone.is_naive(when) else when


def parse_when(text: str) -> datetime | None:
    """A scheduled time from a datetime-local input (UTC) or ISO 8601 text; None when empty.
    Raises ValueError for text that is not a time."""
    text = text.strip()
    return aware(datetime.fromisoformat(text)) if text else None


#: A maintenance window's length as people type it: ``90m``, ``2h``, ``1d``, ``30s``.
_LENGTH = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_until(text: str, now: datetime | None = None) -> datetime | None:
    """The end of a window: a time (as ``parse_when``) or a length from now (``2h``); None
    when empty. Raises ValueError for anything else."""
    text = text.strip()
    match = _LENGTH.match(text)
    if match:
        seconds = float(match.group(1)) * _UNIT[match.group(2)]
        return (now or timezone.now()) + timedelta(seconds=seconds)
    try:
        return parse_when(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a time (2026-11-23T16:00) nor a length (90m, 2h, 1d)"
        ) from None
