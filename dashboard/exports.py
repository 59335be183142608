"""Filters and streamed exports of the audit log, transitions and terms.

One filter parser serves the /audit/ page, the CSV and NDJSON exports and /api/v1/audit, so
the same query string means the same rows everywhere. Exports stream: the rows come from a
server-side cursor (``.iterator``) and leave as chunks of a few hundred lines, so memory stays
flat however long the history is.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from itertools import islice
from typing import Any
from urllib.parse import urlencode

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.db.models import Model, QuerySet
from django.http import HttpRequest, StreamingHttpResponse

from elections.models import AuditEntry, Term, Transition
from elections.serializers import iso
from elections.times import aware

#: Rows fetched from the database per round trip, and rows per chunk sent to the client.
FETCH_ROWS = 2000
CHUNK_ROWS = 500
PAGE_SIZE = 100
API_MAX_LIMIT = 1000
#: Suggestions for the action filter (the audit log accepts any action name).
KNOWN_ACTIONS = tuple(AuditEntry.Action.values)


class BadFilter(ValueError):
    """A query parameter that cannot be understood; the message says which and why."""


@dataclass(frozen=True)
class Filter:
    """``from`` ≤ time < ``to`` (a date alone as ``to`` includes that whole day, UTC), and
    exact matches on election (the audit entry's target), actor and action."""

    since: datetime | None = None
    until: datetime | None = None
    election: str = ""
    actor: str = ""
    action: str = ""
    #: The parameters as given, for the form and for links that keep the filter.
    params: dict[str, str] = field(default_factory=dict)

    NAMES = ("from", "to", "election", "actor", "action")

    @classmethod
    def from_query(cls, query: Mapping[str, Any]) -> Filter:
        params = {k: str(query.get(k, "")).strip() for k in cls.NAMES}
        params = {k: v for k, v in params.items() if v}
        since = parse_time(params.get("from", ""), "from")
        until = parse_time(params.get("to", ""), "to", end_of_day=True)
        if since and until and since >= until:
            raise BadFilter(f"'from' ({params['from']}) must be before 'to' ({params['to']})")
        return cls(
            since=since,
            until=until,
            election=params.get("election", ""),
            actor=params.get("actor", ""),
            action=params.get("action", ""),
            params=params,
        )

    def query_string(self, **extra: str | int) -> str:
        return urlencode({**self.params, **{k: v for k, v in extra.items() if v}})


# "+01:00" arrives as " 01:00" when a client forgets to encode the "+" in a query string.
_SPACED_OFFSET = re.compile(r"(.*\d[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?) (\d{2}(?::?\d{2})?)")


def parse_time(text: str, name: str, *, end_of_day: bool = False) -> datetime | None:
    """An ISO 8601 date or datetime; naive means UTC. None when empty."""
    if not text:
        return None
    if len(text) == 10:
        try:
            day = date.fromisoformat(text)
        except ValueError:
            pass
        else:
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return start + timedelta(days=1) if end_of_day else start
    if match := _SPACED_OFFSET.fullmatch(text):
        text = f"{match[1]}+{match[2]}"
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise BadFilter(
            f"'{name}' must be an ISO 8601 date or date and time "
            f"(e.g. 2026-11-01 or 2026-11-01T12:00:00Z), not {text!r}"
        ) from None
    return aware(value)


def parse_int(text: str | None, name: str, *, low: int, high: int, default: int | None) -> Any:
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadFilter(f"'{name}' must be a whole number, not {text!r}") from None
    if not low <= value <= high:
        raise BadFilter(f"'{name}' must be between {low} and {high}, not {value}")
    return value


# -- what each kind of row is filtered on ---------------------------------------------------


@dataclass(frozen=True)
class Source:
    """What an export or page reads: the filter's fields mapped onto one model's."""

    model: type[Model]
    #: The field the ``from``/``to`` range applies to.
    time: str
    #: The field naming the election.
    election: str
    #: Filter fields matched exactly on the field of the same name (audit: actor, action).
    exact: tuple[str, ...] = ()

    def rows(self, flt: Filter) -> QuerySet[Any]:
        lookups: dict[str, Any] = {}
        if flt.since:
            lookups[f"{self.time}__gte"] = flt.since
        if flt.until:
            lookups[f"{self.time}__lt"] = flt.until
        if flt.election:
            lookups[self.election] = flt.election
        lookups.update({name: getattr(flt, name) for name in self.exact if getattr(flt, name)})
        return self.model.objects.filter(**lookups)


AUDIT = Source(AuditEntry, "at", "target", ("actor", "action"))
TRANSITIONS = Source(Transition, "agent_time", "election__name")
#: Terms that started in the range.
TERMS = Source(Term, "started", "election__name")


def audit_page(flt: Filter, before: int | None, size: int) -> tuple[list[AuditEntry], int | None]:
    """Newest first, ``size`` entries older than id ``before``; and the cursor of the next
    page (keyset: stable while new entries arrive, and as fast on page 1000 as on page 1)."""
    rows = AUDIT.rows(flt).order_by("-id")
    if before is not None:
        rows = rows.filter(id__lt=before)
    page = list(rows[: size + 1])
    more = len(page) > size
    page = page[:size]
    return page, (page[-1].id if more else None)


# -- exports ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Export:
    name: str
    #: (column, database field) in output order.
    columns: tuple[tuple[str, str], ...]
    source: Source
    #: Oldest first: logs read top to bottom, and an audit export re-verifies in this order.
    order: tuple[str, ...]

    def values(self, flt: Filter) -> Iterator[tuple[Any, ...]]:
        fields = [f for _, f in self.columns]
        rows = self.source.rows(flt).order_by(*self.order).values_list(*fields)
        return rows.iterator(chunk_size=FETCH_ROWS)


EXPORTS = {
    "audit": Export(
        "audit",
        tuple(
            (c, c)
            for c in (
                "id",
                "at",
                "actor_type",
                "actor",
                "action",
                "target",
                "detail",
                "ip",
                "prev_hash",
                "hash",
            )
        ),
        AUDIT,
        ("id",),
    ),
    "transitions": Export(
        "transitions",
        (
            ("id", "id"),
            ("election", "election__name"),
            ("agent", "agent_id"),
            ("seq", "seq"),
            ("from", "from_state"),
            ("to", "to_state"),
            ("token", "token"),
            ("leader", "leader"),
            ("agent_time", "agent_time"),
            ("received", "received"),
            ("reason", "reason"),
            ("detail", "detail"),
        ),
        TRANSITIONS,
        ("agent_time", "id"),
    ),
    "terms": Export(
        "terms",
        (
            ("id", "id"),
            ("election", "election__name"),
            ("leader", "leader_id"),
            ("token", "token"),
            ("started", "started"),
            ("ended", "ended"),
            ("end_reason", "end_reason"),
            ("gap", "gap"),
        ),
        TERMS,
        ("started", "id"),
    ),
}
FORMATS = {"csv": "text/csv; charset=utf-8", "ndjson": "application/x-ndjson"}


def _plain(value: Any) -> Any:
    # Full isoformat, not DjangoJSONEncoder's milliseconds: an exported audit entry must
    # hash to the same value as the stored one.
    return iso(value) if isinstance(value, datetime) else value


#: A cell a spreadsheet would run as a formula (OWASP's list): it gets a leading quote.
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A value as a CSV cell; text a spreadsheet would take for a formula is defused.

    Election names, details and reasons come from agents and operators: ``=HYPERLINK(...)``
    in a reason must reach an analyst's spreadsheet as text. NDJSON keeps values as they are.
    """
    if value is None:
        return ""
    if isinstance(value, dict | list):
        value = json.dumps(value)
    value = _plain(value)
    if isinstance(value, str) and value.startswith(_FORMULA):
        return "'" + value
    return value


def csv_chunks(export: Export, flt: Filter) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([name for name, _ in export.columns])
    rows = export.values(flt)
    while True:
        for row in islice(rows, CHUNK_ROWS):
            writer.writerow([csv_cell(v) for v in row])
        chunk = buffer.getvalue()
        if not chunk:
            return
        yield chunk
        buffer.seek(0)
        buffer.truncate()


def ndjson_chunks(export: Export, flt: Filter) -> Iterator[str]:
    names = [name for name, _ in export.columns]
    rows = export.values(flt)
    while lines := [
        json.dumps(dict(zip(names, map(_plain, row), strict=True)), ensure_ascii=False) + "\n"
        for row in islice(rows, CHUNK_ROWS)
    ]:
        yield "".join(lines)


class _AsyncChunks:
    """Pulls a synchronous chunk generator from Django's per-request sync thread (where the
    database connection and its server-side cursor live), one chunk per hop.

    Under ASGI, Django would otherwise read a synchronous iterator to the end into a list
    before sending the first byte. ``close`` (called by the response when it is closed, in
    that same thread) ends the generator and with it the cursor, also on a disconnect.
    """

    def __init__(self, chunks: Iterator[str]) -> None:
        self._chunks = chunks
        self._next = sync_to_async(lambda: next(self._chunks, None), thread_sensitive=True)

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        chunk = await self._next()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


def export_response(request: HttpRequest, kind: str, fmt: str, flt: Filter) -> Any:
    export = EXPORTS[kind]
    chunks = (csv_chunks if fmt == "csv" else ndjson_chunks)(export, flt)
    content: Iterator[str] | _AsyncChunks = (
        _AsyncChunks(chunks) if isinstance(request, ASGIRequest) else chunks
    )
    response = StreamingHttpResponse(content, content_type=FORMATS[fmt])
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    response["Content-Disposition"] = f'attachment; filename="electorate-{kind}-{stamp}.{fmt}"'
    response["X-Accel-Buffering"] = "no"  # a proxy should pass chunks on, not collect them
    response["Cache-Control"] = "no-store"
    return response
