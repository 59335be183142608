"""Ingest counters, summed over every server process in the database.

The dashboard runs several daphne processes behind one socket, and a scrape of ``/metrics``
reaches any one of them: counters kept only in one process's memory would jump between the
processes' values from scrape to scrape. So each process counts in memory (``meter``:
frames, events, events stored, and each frame's lag from its arrival at the ingest queue to
its commit), and adds its counts to ``MetricCounter`` rows with one statement (``write``)
once a second (``Flusher``, started by the ingest queue) and before it answers a scrape.
A scrape of any process therefore reads the fleet-wide totals, at most a second behind for
the other processes; the totals survive restarts (a process that dies loses at most its last
second of counts); and counting costs the ingest path no statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import defaultdict
from collections.abc import Iterable

from django.db import connection, transaction

from elections.db import run_db
from elections.models import MetricCounter
from elections.per_loop import PerLoop

log = logging.getLogger(__name__)

#: Upper bounds (seconds) of the ingest lag histogram: a healthy ack takes milliseconds, a
#: database under strain seconds.
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

FRAMES, EVENTS, STORED = "ingest_frames", "ingest_events", "ingest_events_stored"
LAG_SUM, LAG_COUNT = "ingest_lag_sum", "ingest_lag_count"
#: Every counter name (the lag buckets are ``ingest_lag_le:<bound>``, cumulative).
NAMES = (FRAMES, EVENTS, STORED, LAG_SUM, LAG_COUNT, *(f"ingest_lag_le:{b}" for b in LAG_BUCKETS))

FLUSH_EVERY = 1.0


class Meter:
    """One process's counts since its last write; safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, float] = defaultdict(float)

    def add(self, counts: dict[str, float]) -> None:
        with self._lock:
            for name, value in counts.items():
                self._pending[name] += value

    def ingested(self, frames: int, events: int, stored: int) -> None:
        self.add({FRAMES: frames, EVENTS: events, STORED: stored})

    def lags(self, seconds: Iterable[float]) -> None:
        counts: dict[str, float] = defaultdict(float)
        for lag in seconds:
            counts[LAG_SUM] += lag
            counts[LAG_COUNT] += 1
            for bound in LAG_BUCKETS:
                if lag <= bound:
                    counts[f"ingest_lag_le:{bound}"] += 1
        self.add(counts)

    def take(self) -> dict[str, float]:
        with self._lock:
            pending, self._pending = dict(self._pending), defaultdict(float)
        return {name: value for name, value in pending.items() if value}


#: This process's meter.
meter = Meter()


def write(counts: dict[str, float]) -> None:
    """Add ``counts`` to the stored totals: one statement, rows in name order (no deadlock
    between processes writing at once)."""
    if not counts:
        return
    table = connection.ops.quote_name(MetricCounter._meta.db_table)
    names = sorted(counts)
    rows = ", ".join(["(%s, %s)"] * len(names))
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (name, value) VALUES {rows} "
            f"ON CONFLICT (name) DO UPDATE SET value = {table}.value + excluded.value",
            [value for name in names for value in (name, counts[name])],
        )


def flush() -> None:
    """Write what this process counted (on failure it is kept for the next try)."""
    counts = meter.take()
    try:
        write(counts)
    except Exception:
        meter.add(counts)
        raise


def totals() -> dict[str, float]:
    """Every process's counts, this one's included up to now (one write, one read)."""
    try:
        flush()
    except Exception:  # a scrape still answers with what is stored
        log.exception("could not write this process's ingest counts")
    stored = dict(MetricCounter.objects.values_list("name", "value"))
    return {name: stored.get(name, 0.0) for name in NAMES}


class Flusher:
    """Writes the process's meter every ``FLUSH_EVERY`` seconds, off the event loop."""

    def __init__(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="meters")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            try:
                await run_db(flush)
            except Exception:
                log.exception("could not write ingest counts; retrying")

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


#: The flusher of the running event loop (one per server process).
flusher = PerLoop(Flusher)
