"""The durable outbox: every transition is written here before it is sent.

Sequence numbers are per agent, gap-free, and survive restarts (``meta.last_seq``). Events
leave the spool only when the dashboard acks them, so nothing is lost while it is away.

``Spool`` is the SQLite file, used from one thread. ``AsyncSpool`` is what the agent uses on
its event loop: every statement runs on one dedicated thread, because a commit with
``synchronous=FULL`` waits for the disk and the loop must keep renewing leases meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('last_seq', 0);
"""


class Spool:
    def __init__(self, path: Path | str | None) -> None:
        self.path = str(path) if path else ":memory:"
        # Bound to the thread that opens it: use from any other thread raises at once.
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    @property
    def last_seq(self) -> int:
        return self._db.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()[0]

    def append(self, event: dict[str, Any]) -> int:
        """Store one event under the next seq and return it."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            seq = self.last_seq + 1
            self._db.execute("UPDATE meta SET value=? WHERE key='last_seq'", (seq,))
            self._db.execute(
                "INSERT INTO events (seq, body) VALUES (?, ?)",
                (seq, json.dumps({**event, "seq": seq}, default=str)),
            )
        return seq

    def pending(self, after: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT body FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
        ).fetchall()
        return [json.loads(body) for (body,) in rows]

    def count(self) -> int:
        return self._db.execute("SELECT count(*) FROM events").fetchone()[0]

    def ack(self, seq: int) -> None:
        """The dashboard stored everything up to ``seq``: forget it here.

        When the dashboard knows a higher seq than this spool ever assigned, the spool file was
        reset (a new disk, a deleted file): renumber what is pending after it, so the
        dashboard's (agent, seq) idempotency does not swallow new events as replays.
        """
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if seq <= self.last_seq:
                self._db.execute("DELETE FROM events WHERE seq <= ?", (seq,))
            else:
                rows = self._db.execute("SELECT seq, body FROM events ORDER BY seq").fetchall()
                self._db.execute("DELETE FROM events")
                next_seq = seq
                for _, body in rows:
                    next_seq += 1
                    event = {**json.loads(body), "seq": next_seq}
                    self._db.execute(
                        "INSERT INTO events (seq, body) VALUES (?, ?)",
                        (next_seq, json.dumps(event)),
                    )
                self._db.execute("UPDATE meta SET value=? WHERE key='last_seq'", (next_seq,))

    def close(self) -> None:
        self._db.close()


class AsyncSpool:
    """The spool for code on an event loop: every SQLite statement runs on one writer thread.

    One thread keeps the statements in submission order, so seqs stay in the order of the
    transitions and a read submitted after an append sees it. The link's reads and acks take
    the same thread rather than a second connection: an ack rewrites seqs when it renumbers,
    so it must not interleave with an append anyway, and a slow disk only delays reporting.
    ``count()`` and ``last_seq`` are kept in memory for the health endpoint and the hello.
    """

    def __init__(self, path: Path | str | None) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._spool: Spool | None = None
        self._closed = False
        # Written by the spool thread after each commit, read on the loop (a plain int).
        self._last_seq = 0
        self._count = 0

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def count(self) -> int:
        """Events not yet acked (as of the last finished write)."""
        return self._count

    async def open(self) -> None:
        await self._run(self._open)

    async def append(self, event: dict[str, Any]) -> int:
        """Store one event under the next seq; return once it is on disk."""
        return await self._write(self._in_thread(lambda spool: spool.append(event)))

    async def ack(self, seq: int) -> None:
        await self._write(self._in_thread(lambda spool: spool.ack(seq)))

    async def pending(self, after: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        read = self._in_thread(lambda spool: spool.pending(after, limit), changes=False)
        return await self._run(read)

    async def flush(self) -> None:
        """Wait for every operation submitted so far."""
        await self._run(lambda: None)

    async def close(self) -> None:
        """Finish what is queued, then close the file and let the thread go."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._run(self._close)
        finally:
            self._executor.shutdown(wait=False)

    # -- on the spool thread ----------------------------------------------------------------

    def _open(self) -> None:
        self._spool = Spool(self.path)
        self._refresh(self._spool)

    def _close(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    def _in_thread(self, operation: Callable[[Spool], T], changes: bool = True) -> Callable[[], T]:
        def run() -> T:
            if self._spool is None:
                raise RuntimeError("the spool is not open")
            result = operation(self._spool)
            if changes:
                self._refresh(self._spool)
            return result

        return run

    def _refresh(self, spool: Spool) -> None:
        self._last_seq = spool.last_seq
        self._count = spool.count()

    # -- on the loop --------------------------------------------------------------------------

    async def _run(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def _write(self, call: Callable[[], T]) -> T:
        future = asyncio.get_running_loop().run_in_executor(self._executor, call)
        try:
            # Shielded: a caller that gives up (a callback timeout) must not cancel a queued
            # write, or its event would be lost.
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(self._report)
            raise

    def _report(self, future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.error("spool %s: a write failed: %s", self.path or ":memory:", future.exception())
