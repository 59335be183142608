"""Event to browser: an agent reports a new leader; how long until a browser's live socket
receives the frame naming it, with N agents connected and heartbeating meanwhile."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from bench.fleet import Browser, SimAgent, connected_fleet, median, percentile, session_cookie
from bench.server import Dashboard

#: Elections a browser can watch at once (one page of the map, filtered to the sample).
WATCHED = 50


@dataclass
class LatencyFigures:
    agents: int
    samples: int
    p50: float
    p99: float
    missed: int


async def run(
    dashboard: Dashboard, *, agents: int, samples: int = 100, period: float = 3.0
) -> LatencyFigures:
    prefix = f"lat{random.randrange(10**6)}"
    fleet = await connected_fleet(dashboard, prefix, agents, lambda a: [f"{a}/e"])
    stop = asyncio.Event()

    async def beat(agent: SimAgent) -> None:  # the rest of the fleet keeps talking
        await asyncio.sleep(random.uniform(0, period))
        while not stop.is_set():
            await agent.heartbeat({f"{agent.id}/e": {"state": "follower"}})
            await asyncio.sleep(period)

    beating = [asyncio.create_task(beat(a)) for a in fleet]
    dashboard.user("bench-viewer", "bench-viewer-password")
    session = session_cookie(dashboard.url, "bench-viewer", "bench-viewer-password")
    watched = fleet[: min(WATCHED, agents)]
    browser = Browser(dashboard.url, session, query=f"q={prefix}-000")
    await browser.open()
    await asyncio.sleep(2)  # the snapshot arrived
    latencies: list[float] = []
    missed = 0
    for n in range(samples):
        agent = watched[n % len(watched)]
        token = 1000 + n
        since = len(browser.frames)
        started = time.monotonic()
        await agent.lead(f"{agent.id}/e", token)
        # The row names the leader and shows the new term.
        arrived = await browser.wait_for(f'data-testid="token">{token}<', since, timeout=5)
        if arrived is None:
            missed += 1
        else:
            latencies.append(arrived - started)
        await asyncio.sleep(random.uniform(0.05, 0.15))
    stop.set()
    await asyncio.gather(*beating, return_exceptions=True)
    await browser.close()
    await asyncio.gather(*(a.close() for a in fleet), return_exceptions=True)
    return LatencyFigures(
        agents=agents,
        samples=samples,
        p50=median(latencies),
        p99=percentile(latencies, 0.99),
        missed=missed,
    )
