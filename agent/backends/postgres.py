"""PostgreSQL election on a session-level advisory lock (the Go ``pgelector`` design, fixed).

Each agent keeps one connection per election. Whoever's session holds
``pg_try_advisory_lock(lock_id)`` leads. Followers retry every ``check_interval`` and
``LISTEN`` on a per-election channel on that same connection, so a resign (``NOTIFY``) wakes
them at once. The leader proves every ``check_interval`` that *its own session* still holds
the lock: ``pg_locks`` matched on ``locktype``, ``database``, ``classid`` (high 32 bits of the
key), ``objid`` (low 32 bits) and ``objsubid = 1`` (the single-bigint form) **and**
``pid = pg_backend_pid()``. Matching ``objid`` alone, as the Go elector did, mistakes another
key with the same low 32 bits (or another session's lock) for ours.

Why the lease alone cannot be the whole story, and what we do about it
----------------------------------------------------------------------
PostgreSQL frees a session lock only when the session ends, and it can end without the leader
hearing of it: an admin's ``pg_terminate_backend``, a server restart, or the server's TCP
keepalive giving up on a half-open socket. From that moment a follower can take the lock,
while the leader still believes in its last successful check. No lease length closes that
gap on the leader's side alone, so two rules close it together:

1. The leader's lease is ``ttl`` from the moment its last successful holder check was *sent*
   (renewed every ``check_interval``, which must be at most ``ttl / 2`` so that one slow check
   can be retried). A check that fails, or does not answer within its budget (the check
   interval, at least 0.5 s, never past the lease), costs the session: its connection is
   closed, since its state is unknown, and the leader demotes at once (``Lost``). A
   connection that fails is a lost session, hence a lost lock, hence ``Lost`` too.
2. The fencing row names the current holder; a clean resign clears it *before* unlocking.
   A winner that finds the row still naming someone (who therefore did not resign) keeps the
   lock for ``ttl`` *after the lock was granted* before it claims leadership. The old
   leader's last proof was sent before its session died, which was before we were granted
   the lock, so its lease has run out by the time ours starts. An orderly resign hands over
   at once; a crashed or cut-off leader is replaced after about ``ttl + check_interval``.
   Pick ``ttl`` of two or three check intervals for fast failover.

Nothing may hang a leader on a dead socket: libpq ``connect_timeout``, TCP keepalives and
``tcp_user_timeout`` on the client; ``statement_timeout``, ``lock_timeout`` and the server's
own ``tcp_keepalives_*``/``tcp_user_timeout`` on the session (so the server frees the lock of
a vanished client within seconds, not the OS default of hours); and our own deadline on
every query. A query past its deadline gets its connection closed rather than cancelled:
psycopg's cancellation waits up to ten seconds on the server, which is the very socket that
stopped answering.

Fencing token: ``electorate_fencing(election, token, holder, pid)``, created when missing;
the winner bumps ``token`` and records its agent id and backend pid from the session that
holds the lock, only while ``pg_locks`` shows it. ``observe`` names the holder only while that
very pid holds the lock, so a crashed leader is never reported.
Relinquish: after ``relinquish_interval`` (0 = never) the leader resigns, reports ``Lost``
with the reason, and stays out of the race for two check intervals, so a follower (woken by
the ``NOTIFY``) takes over instead of the old leader winning straight back. A cron-based
relinquish is not implemented.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import Field, field_validator

from agent.backends.base import Backend, BackendOptions, Lease, Seat
from agent.backends.errors import Lost, Misconfigured, Unavailable, describe, unavailable
from agent.durations import Duration

log = logging.getLogger(__name__)

T = TypeVar("T")

TABLE = "electorate_fencing"
#: The shortest deadline we give a query: a busy server is not a dead one.
MIN_BUDGET = 0.5
#: Our own queries stop this long before the lease ends, ahead of the runner's margin.
LEASE_MARGIN = 0.15
#: NAMEDATALEN - 1: longer channel names are an error in pg_notify().
MAX_CHANNEL = 63

_MATCH = """
    locktype = 'advisory'
    AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
    AND classid = %(classid)s::int8::oid
    AND objid = %(objid)s::int8::oid
    AND objsubid = 1
    AND granted
"""
_HELD = f"SELECT EXISTS (SELECT 1 FROM pg_locks WHERE {_MATCH} AND pid = pg_backend_pid())"
_TRY_LOCK = "SELECT pg_try_advisory_lock(%(key)s::int8)"
_ROW = f"SELECT holder, token FROM {TABLE} WHERE election = %(election)s"
_CLAIM = f"""
WITH held AS (SELECT 1 FROM pg_locks WHERE {_MATCH} AND pid = pg_backend_pid()),
bump AS (
    INSERT INTO {TABLE} AS f (election, token, holder, pid)
    SELECT %(election)s, 1, %(agent)s, pg_backend_pid() FROM held
    ON CONFLICT (election) DO UPDATE
    SET token = f.token + 1, holder = EXCLUDED.holder, pid = EXCLUDED.pid
    RETURNING f.token
)
SELECT token, pg_notify(%(channel)s, 'won ' || %(agent)s || ' ' || token) FROM bump
"""
_CLEAR = f"""
UPDATE {TABLE} SET holder = NULL, pid = NULL
WHERE election = %(election)s AND token = %(token)s AND holder = %(agent)s
"""
_UNLOCK = "SELECT pg_advisory_unlock(%(key)s::int8), pg_notify(%(channel)s, %(payload)s)"
_OBSERVE = f"""
SELECT f.holder, f.token, EXISTS (SELECT 1 FROM pg_locks WHERE {_MATCH} AND pid = f.pid)
FROM (SELECT 1) AS one LEFT JOIN {TABLE} AS f ON f.election = %(election)s
"""
_CREATE = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    election text PRIMARY KEY,
    token bigint NOT NULL,
    holder text,
    pid integer
)
"""
#: Session settings, applied only where the server knows them (idle_session_timeout: PG 14+).
_SETTINGS = """
SELECT set_config(s.name, s.value, false)
FROM (VALUES {}) AS s(name, value) JOIN pg_settings AS p ON p.name = s.name
"""


def default_channel(election: str) -> str:
    channel = f"electorate:{election}"
    if len(channel.encode()) <= MAX_CHANNEL:
        return channel
    digest = hashlib.blake2b(election.encode(), digest_size=10).hexdigest()
    return f"electorate:{digest}"


class PostgresOptions(BackendOptions):
    dsn: str
    #: The advisory lock key: any bigint.
    lock_id: Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)]
    check_interval: Duration = 1.0
    #: Rotate leadership after this long; 0 = never.
    relinquish_interval: Duration = 300.0
    notify_channel: str | None = None

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a PostgreSQL connection string or URL, got ''")
        try:
            conninfo_to_dict(value)
        except psycopg.ProgrammingError as exc:
            raise ValueError(f"not a valid PostgreSQL connection string: {exc}") from None
        return value

    @field_validator("check_interval")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be more than 0")
        return value

    @field_validator("notify_channel")
    @classmethod
    def _channel(cls, value: str | None) -> str | None:
        if value is not None and not 0 < len(value.encode()) <= MAX_CHANNEL:
            raise ValueError(f"must be 1 to {MAX_CHANNEL} bytes long")
        return value


class PostgresBackend(Backend, name="postgres", options=PostgresOptions, notifies=True):
    @classmethod
    def check_options(cls, options: PostgresOptions, ttl: float) -> tuple[str, str] | None:
        if options.check_interval * 2 > ttl:
            return (
                "check_interval",
                f"must be at most half of ttl ({ttl:g}s): the leader proves its session every "
                "check_interval and trusts a proof for ttl",
            )
        return None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        opts: PostgresOptions = self.options
        self._dsn = opts.dsn
        self.lock_id = opts.lock_id
        unsigned = opts.lock_id & 0xFFFF_FFFF_FFFF_FFFF
        self._classid, self._objid = unsigned >> 32, unsigned & 0xFFFF_FFFF
        self.channel = opts.notify_channel or default_channel(self.election)
        self.check_interval = opts.check_interval
        self.relinquish_interval = opts.relinquish_interval
        self._budget = max(self.check_interval, MIN_BUDGET)
        self._connect_budget = min(max(self.ttl * 0.8, MIN_BUDGET), 10.0)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._table_ready = False
        #: This session holds the lock (it must not be taken twice: session locks stack).
        self._locked = False
        #: Holding the lock but waiting out a predecessor's lease until this monotonic time.
        self._pending_until: float | None = None
        #: Our last win in this process: its token, and when it was won.
        self._token: int | None = None
        self._won_at = 0.0
        #: Out of the race until then (after a relinquish).
        self._hold_until = 0.0

    @property
    def renew_interval(self) -> float:
        return self.check_interval

    @property
    def retry_interval(self) -> float:
        return self.check_interval

    @property
    def session_pid(self) -> int | None:
        """The server process of this election's session (for pg_terminate_backend)."""
        conn = self._conn
        return None if conn is None or conn.closed else conn.info.backend_pid

    def _params(self, **extra: Any) -> dict[str, Any]:
        return {
            "key": self.lock_id,
            "classid": self._classid,
            "objid": self._objid,
            "election": self.election,
            "agent": self.agent_id,
            "channel": self.channel,
            **extra,
        }

    # -- connection -----------------------------------------------------------------------

    async def open(self) -> None:
        await self._session()

    async def _session(self) -> psycopg.AsyncConnection[Any]:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        self._forget()
        self._conn = await self._connect()
        return self._conn

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        params = conninfo_to_dict(self._dsn)
        defaults = {
            "connect_timeout": str(max(2, math.ceil(self._connect_budget))),
            "keepalives": "1",
            "keepalives_idle": str(max(1, int(self.check_interval))),
            "keepalives_interval": "1",
            "keepalives_count": "3",
            "tcp_user_timeout": str(int(self.ttl * 1000)),
            "application_name": f"electorate {self.election}"[:63],
        }
        for name, value in defaults.items():
            params.setdefault(name, value)
        try:
            async with asyncio.timeout(self._connect_budget):
                conn = await psycopg.AsyncConnection.connect(
                    make_conninfo(**params), autocommit=True
                )
        except (psycopg.OperationalError, TimeoutError, OSError) as exc:
            raise unavailable("cannot connect to PostgreSQL", exc) from None
        try:
            await self._timed(conn, self._prepare(conn), self._connect_budget)
        except psycopg.errors.InsufficientPrivilege as exc:
            await conn.close()
            raise Misconfigured(
                f"cannot create table {TABLE} (create it, or grant CREATE): {describe(exc)}"
            ) from None
        except (psycopg.Error, TimeoutError, OSError) as exc:
            await conn.close()
            raise unavailable("cannot prepare the PostgreSQL session", exc) from None
        return conn

    async def _prepare(self, conn: psycopg.AsyncConnection[Any]) -> None:
        budget_ms = str(int(self._budget * 1000))
        settings = {
            # A statement that outlives our deadline is one we already gave up on.
            "statement_timeout": budget_ms,
            "lock_timeout": budget_ms,
            "idle_in_transaction_session_timeout": budget_ms,
            # The lock session sits idle between checks: it must not be timed out for that.
            "idle_session_timeout": "0",
            # Let the server notice a vanished client (and free its lock) within seconds.
            "tcp_keepalives_idle": str(max(1, int(self.check_interval))),
            "tcp_keepalives_interval": "1",
            "tcp_keepalives_count": "3",
            "tcp_user_timeout": str(int(self.ttl * 1000)),
        }
        values = sql.SQL(", ").join(
            sql.SQL("({}, {})").format(sql.Literal(k), sql.Literal(v)) for k, v in settings.items()
        )
        await conn.execute(sql.SQL(_SETTINGS).format(values))
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        if not self._table_ready:
            cur = await conn.execute("SELECT to_regclass(%s)", [TABLE])
            row = await cur.fetchone()
            if row is None or row[0] is None:
                # Agents starting together race on CREATE TABLE IF NOT EXISTS (pg_type).
                with contextlib.suppress(
                    psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable
                ):
                    await conn.execute(_CREATE)
            self._table_ready = True

    async def _timed(
        self, conn: psycopg.AsyncConnection[Any], op: Awaitable[T], budget: float
    ) -> T:
        """Run ``op`` on ``conn`` with a deadline; on overrun or cancellation, drop ``conn``."""
        task = asyncio.ensure_future(op)
        try:
            done, _ = await asyncio.wait({task}, timeout=max(0.0, budget))
        except asyncio.CancelledError:
            await self._abandon(conn, task)
            raise
        if not done:
            await self._abandon(conn, task)
            raise TimeoutError(f"PostgreSQL did not answer within {budget:.2f}s")
        return task.result()

    async def _abandon(self, conn: psycopg.AsyncConnection[Any], task: asyncio.Future[Any]) -> None:
        # Close first: a cancelled psycopg query on an open connection would wait on the server.
        await conn.close()
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        if conn is self._conn:
            self._forget()

    def _forget(self) -> None:
        self._conn = None
        self._locked = False
        self._pending_until = None

    async def _fail(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """The session is in an unknown state: end it (the lock goes with it)."""
        with contextlib.suppress(Exception):
            await conn.close()
        if conn is self._conn:
            self._forget()

    async def _fetch(
        self, conn: psycopg.AsyncConnection[Any], query: str, params: dict[str, Any]
    ) -> tuple[Any, ...] | None:
        cur = await conn.execute(query, params)
        return await cur.fetchone() if cur.description else None

    async def _query(
        self,
        conn: psycopg.AsyncConnection[Any],
        query: str,
        budget: float | None = None,
        **extra: Any,
    ) -> tuple[Any, ...] | None:
        return await self._timed(
            conn,
            self._fetch(conn, query, self._params(**extra)),
            self._budget if budget is None else budget,
        )

    # -- the election ---------------------------------------------------------------------

    async def campaign(self) -> Lease | None:
        if time.monotonic() < self._hold_until:
            return None
        conn = await self._session()
        try:
            if self._pending_until is not None:
                return await self._finish_takeover(conn)
            if not self._locked:
                row = await self._query(conn, _TRY_LOCK)
                if not (row and row[0]):
                    return None
                self._locked = True
            # Read the row only now, holding the lock: nobody else can claim meanwhile.
            row = await self._query(conn, _ROW)
            holder, token = row if row else (None, None)
            ours = holder == self.agent_id and token is not None and token == self._token
            if holder is not None and not ours:
                self._pending_until = time.monotonic() + self.ttl
                log.info(
                    "election %s: took the lock from %s, who did not resign; waiting %.1fs "
                    "for its lease to run out before leading",
                    self.election,
                    holder,
                    self.ttl,
                )
                return None
            return await self._claim(conn)
        except (psycopg.Error, TimeoutError, OSError) as exc:
            await self._fail(conn)
            raise unavailable("campaign failed", exc) from None

    async def _finish_takeover(self, conn: psycopg.AsyncConnection[Any]) -> Lease | None:
        assert self._pending_until is not None
        if time.monotonic() >= self._pending_until:
            return await self._claim(conn)
        row = await self._query(conn, _HELD)
        if not (row and row[0]):
            self._locked = False
            self._pending_until = None
        return None

    async def _claim(self, conn: psycopg.AsyncConnection[Any]) -> Lease | None:
        sent = time.monotonic()
        row = await self._query(conn, _CLAIM)
        self._pending_until = None
        if row is None:  # the session does not hold the lock after all
            self._locked = False
            return None
        self._token = int(row[0])
        self._won_at = sent
        return Lease(self._token, sent + self.ttl)

    async def renew(self, lease: Lease) -> Lease:
        conn = self._conn
        if conn is None or conn.closed or not self._locked:
            self._forget()
            raise Lost("the PostgreSQL session that held the lock is gone")
        if self.relinquish_interval and time.monotonic() - self._won_at >= self.relinquish_interval:
            with contextlib.suppress(Exception):
                await self._release(conn, lease.token, "relinquished")
            # Stay out long enough for a follower, woken by the NOTIFY or its poll, to win.
            self._hold_until = time.monotonic() + 2 * self.check_interval
            raise Lost(
                f"relinquished after {self.relinquish_interval:g}s (relinquish_interval) "
                "so that another candidate can lead"
            )
        budget = min(self._budget, lease.expires - time.monotonic() - LEASE_MARGIN)
        if budget <= 0:
            raise Unavailable("no time left in the lease to check the session")
        sent = time.monotonic()
        try:
            row = await self._query(conn, _HELD, budget)
        except (psycopg.Error, TimeoutError, OSError) as exc:
            await self._fail(conn)
            raise Lost(
                f"could not prove the session still holds the lock: {describe(exc)}"
            ) from None
        if not (row and row[0]):
            self._locked = False
            raise Lost(f"this session no longer holds advisory lock {self.lock_id}")
        return Lease(lease.token, sent + self.ttl)

    async def resign(self, lease: Lease) -> None:
        conn = self._conn
        if conn is None or conn.closed or not self._locked:
            return  # the session, and the lock with it, is gone already
        await self._release(conn, lease.token, "resigned")

    async def _release(self, conn: psycopg.AsyncConnection[Any], token: int, why: str) -> None:
        try:
            # Clear the holder first: a winner that finds it empty may lead at once.
            await self._query(conn, _CLEAR, token=token)
            await self._query(conn, _UNLOCK, payload=f"{why} {self.agent_id} {token}")
            self._locked = False
        except (psycopg.Error, TimeoutError, OSError) as exc:
            await self._fail(conn)  # ending the session frees the lock too
            raise unavailable("resign failed", exc) from None

    async def observe(self) -> Seat:
        conn = await self._session()
        try:
            row = await self._query(conn, _OBSERVE)
        except (psycopg.Error, TimeoutError, OSError) as exc:
            await self._fail(conn)
            raise unavailable("cannot read the seat", exc) from None
        holder, token, held = row if row else (None, None, False)
        # The holder counts only while its own session holds the lock: the row outlives a
        # crashed leader, and during a takeover the lock is already the successor's.
        return Seat(holder if held else None, token)

    async def wait_for_change(self, timeout: float) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            await asyncio.sleep(timeout)
            return
        try:
            gen = conn.notifies(timeout=timeout, stop_after=1)
            async with contextlib.aclosing(gen):
                async for _ in gen:
                    break
        except (psycopg.Error, OSError):
            await self._fail(conn)  # the next campaign reconnects

    async def close(self) -> None:
        conn = self._conn
        self._forget()
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()
