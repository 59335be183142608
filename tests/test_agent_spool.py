"""The spool's disk work stays off the event loop that renews leases."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from agent.config import load_config
from agent.service import Agent
from agent.spool import AsyncSpool
from tests.helpers import eventually, free_port
from tests.live import LiveDashboard

ELECTION = """
[[election]]
name = "{name}"
backend = "raft"
ttl = "2s"
listen = "127.0.0.1:{port}"
heartbeat = "100ms"
election_timeout = "1s"
secret = "spool-test-secret"
"""


def write_config(tmp_path: Path, agent: str, elections: list[str], extra: str = "") -> Path:
    text = f'[agent]\nid = "{agent}"\nspool = "agent.spool"\n{extra}'
    for name in elections:
        text += ELECTION.format(name=name, port=free_port())
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


async def test_sqlite_statements_run_off_the_event_loop_thread(
    tmp_path: Path, embedded_dashboard: LiveDashboard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appends, the link's reads and its acks all run on the spool's own thread."""
    statements: list[tuple[int, str]] = []
    connect = sqlite3.connect

    def traced_connect(*args: object, **kwargs: object) -> sqlite3.Connection:
        db = connect(*args, **kwargs)  # type: ignore[arg-type]
        db.set_trace_callback(lambda sql: statements.append((threading.get_ident(), sql)))
        return db

    monkeypatch.setattr(sqlite3, "connect", traced_connect)
    (tmp_path / "token").write_text(embedded_dashboard.token("spool-thread-1"))
    extra = f'dashboard = "{embedded_dashboard.ws_agent}"\ntoken_file = "token"\n'
    agent = Agent(load_config(write_config(tmp_path, "spool-thread-1", ["spool/t"], extra)))
    loop_thread = threading.get_ident()
    await agent.start()
    try:
        await eventually(lambda: agent.is_leader("spool/t"), timeout=10)
        await agent.runners["spool/t"].step_down(hold_off=0)
        await eventually(lambda: agent.is_leader("spool/t"), timeout=10)
        assert agent.link is not None
        await eventually(lambda: agent.link.acked >= 4 and agent.spool.count() == 0, timeout=15)
    finally:
        await agent.stop()

    def ran(prefix: str) -> bool:
        return any(sql.lstrip().upper().startswith(prefix) for _, sql in statements)

    # The trace saw the writes, the link's reads and the acks' deletes: it is not vacuous.
    assert ran("INSERT INTO EVENTS") and ran("SELECT BODY FROM EVENTS") and ran("DELETE FROM")
    on_loop = [sql for ident, sql in statements if ident == loop_thread]
    assert on_loop == [], f"{len(on_loop)} statement(s) ran on the event loop: {on_loop[:3]}"


async def test_a_slow_spool_does_not_delay_a_running_election(tmp_path: Path) -> None:
    """Another connection holds the spool's write lock, so appends really wait (as on a slow
    disk); meanwhile the loop keeps ticking and a leading election keeps renewing its lease."""
    agent = Agent(load_config(write_config(tmp_path, "slow-1", ["slow/steady", "slow/moving"])))
    await agent.start()
    holder: sqlite3.Connection | None = None
    try:
        steady, moving = agent.runners["slow/steady"], agent.runners["slow/moving"]
        await eventually(lambda: steady.is_leader() and moving.is_leader(), timeout=10)
        await eventually(lambda: agent.spool.last_seq >= 4, timeout=5)  # both elections won
        before = agent.spool.last_seq

        holder = sqlite3.connect(tmp_path / "agent.spool", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the spool's next write waits for this lock

        lags: list[float] = []
        leading: list[bool] = []

        async def tick() -> None:
            while True:
                started = time.monotonic()
                await asyncio.sleep(0.01)
                lags.append(time.monotonic() - started - 0.01)
                leading.append(steady.is_leader())

        ticker = asyncio.create_task(tick())
        step_down = asyncio.create_task(moving.step_down(hold_off=0))
        await asyncio.sleep(2.0)
        # The step-down's transition is waiting for the disk: the write really is slow.
        assert moving.state != "leader"
        assert agent.spool.last_seq == before
        holder.rollback()
        holder.close()
        holder = None
        await eventually(lambda: agent.spool.last_seq > before, timeout=5)
        ticker.cancel()
        await step_down

        assert max(lags) < 0.5, f"the event loop stalled for {max(lags):.2f}s"
        assert len(lags) > 50
        assert all(leading), "the steady election lost its lease while the spool was slow"
        assert steady.leader_changes == 1 and steady.state == "leader"
    finally:
        if holder is not None:
            holder.rollback()
            holder.close()
        await agent.stop()


async def test_the_threaded_spool_keeps_order_and_writes_a_write_whose_caller_gave_up(
    tmp_path: Path,
) -> None:
    spool = AsyncSpool(tmp_path / "a.spool")
    await spool.open()
    try:
        # Many coroutines at once: seqs follow submission order, with no gap.
        seqs = await asyncio.gather(*(spool.append({"n": i}) for i in range(50)))
        assert seqs == list(range(1, 51))
        assert [e["n"] for e in await spool.pending(after=0, limit=100)] == list(range(50))

        holder = sqlite3.connect(tmp_path / "a.spool", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        blocked = asyncio.create_task(spool.append({"n": 50}))
        queued = asyncio.create_task(spool.append({"n": 51}))
        await asyncio.sleep(0.3)
        queued.cancel()  # e.g. the runner's callback timeout: the event must still be stored
        with pytest.raises(asyncio.CancelledError):
            await queued
        holder.rollback()
        holder.close()
        assert await blocked == 51
        await spool.flush()
        assert spool.last_seq == 52 and spool.count() == 52

        # A reset spool is renumbered after what the dashboard already has, on the thread too.
        await spool.ack(100)
        assert [e["seq"] for e in await spool.pending(limit=3)] == [101, 102, 103]
        assert spool.last_seq == 152 and await spool.append({"n": 52}) == 153
    finally:
        await spool.close()
