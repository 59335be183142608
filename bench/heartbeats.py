"""Heartbeats: N agents each send a heartbeat every few seconds that changes nothing; how
busy are the server processes, PostgreSQL and Redis, and what does one heartbeat cost?"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import psycopg

from bench.fleet import SimAgent, connected_fleet
from bench.server import Dashboard, cpu_seconds, service_pids


@dataclass
class HeartbeatFigures:
    agents: int
    per_second: float
    #: CPU cores busy, dashboard processes alone and with PostgreSQL and Redis.
    server_cores: float
    total_cores: float
    #: Database transactions per heartbeat (the liveness flush is shared by all).
    transactions_per_heartbeat: float
    errors: int


def _transactions(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = "
            "current_database()"
        ).fetchone()
    return int(row[0])


async def run(
    dashboard: Dashboard, *, agents: int, period: float = 3.0, seconds: float = 30.0
) -> HeartbeatFigures:
    prefix = f"hb{random.randrange(10**6)}"
    fleet = await connected_fleet(dashboard, prefix, agents, lambda a: [f"{a}/e"])
    # Every agent leads its own election: each heartbeat renews a lease, the costly case.
    for agent in fleet:
        await agent.lead(f"{agent.id}/e", 1)
    await asyncio.gather(*(a.drained(60) for a in fleet))
    stop = asyncio.Event()
    sent = 0

    async def beat(agent: SimAgent) -> None:
        nonlocal sent
        await asyncio.sleep(random.uniform(0, period))
        state = {f"{agent.id}/e": {"state": "leader", "leader": agent.id, "token": 1}}
        while not stop.is_set():
            state[f"{agent.id}/e"]["ttl_left"] = 3.0
            await agent.heartbeat(state)
            sent += 1
            await asyncio.sleep(period)

    tasks = [asyncio.create_task(beat(a)) for a in fleet]
    await asyncio.sleep(period + 1)  # every agent is beating
    servers = dashboard.pids()
    others = service_pids("postgres") + service_pids("redis-server")
    sent0, dsn = sent, dashboard.env["DATABASE_URL"]
    xacts0 = _transactions(dsn)
    server0, others0, started = cpu_seconds(servers), cpu_seconds(others), time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - started
    server_cores = (cpu_seconds(servers) - server0) / elapsed
    other_cores = (cpu_seconds(others) - others0) / elapsed
    beats = sent - sent0
    xacts = _transactions(dsn) - xacts0 - 2  # the two reads of the counter
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    errors = sum(len(a.errors) for a in fleet)
    await asyncio.gather(*(a.close() for a in fleet), return_exceptions=True)
    return HeartbeatFigures(
        agents=agents,
        per_second=beats / elapsed,
        server_cores=server_cores,
        total_cores=server_cores + other_cores,
        transactions_per_heartbeat=xacts / max(beats, 1),
        errors=errors,
    )
