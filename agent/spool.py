"""The durable outbox: every transition is written here before it is sent.

Sequence numbers are per agent, gap-free, and survive restarts (``meta.last_seq``). Events
leave the spool only when the dashboard acks them, so nothing is lost while it is away.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('last_seq', 0);
"""


class Spool:
    def __init__(self, path: Path | str | None) -> None:
        self.path = str(path) if path else ":memory:"
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
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
