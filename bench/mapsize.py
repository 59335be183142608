"""The leader map at fleet size: ``GET /``, ``GET /api/v1/elections`` and the live snapshot
with N elections registered by real agents' hellos and led through their events."""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request
from dataclasses import dataclass

from bench.fleet import Browser, SimAgent, connect_all, median, session_cookie
from bench.server import Dashboard

PER_AGENT = 50


@dataclass
class MapFigures:
    elections: int
    page_seconds: float
    page_bytes: int
    api_seconds: float
    api_all_pages_seconds: float
    api_total: int
    snapshot_seconds: float
    snapshot_frames: int
    largest_frame: int


def _get(url: str, headers: dict[str, str]) -> tuple[float, bytes]:
    request = urllib.request.Request(url, headers=headers)
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=60) as response:
        body = response.read()
    return time.monotonic() - started, body


async def build(dashboard: Dashboard, elections: int) -> str:
    """Register ``elections`` through agents' hellos; most get a leader, some stay leaderless."""
    prefix = f"map{random.randrange(10**6)}"
    agents = -(-elections // PER_AGENT)
    ids = [f"{prefix}-{i:04d}" for i in range(agents)]
    tokens = dashboard.agent_tokens(ids)
    clusters = ["eu-1", "eu-2", "us-1", "us-2", "ap-1"]
    fleet = [
        SimAgent(
            dashboard.ws_agent,
            a,
            tokens[a],
            [
                f"{prefix}/svc-{n:05d}"
                for n in range(i * PER_AGENT, min(elections, (i + 1) * PER_AGENT))
            ],
            labels={"cluster": clusters[i % len(clusters)]},
        )
        for i, a in enumerate(ids)
    ]
    await connect_all(fleet, concurrency=10)
    for agent in fleet:
        leading = agent.elections[:-1]  # one in fifty stays leaderless
        await agent.send_events([agent.event(n, "leader", 1, agent.id) for n in leading])
    await asyncio.gather(*(a.drained(120) for a in fleet))
    # Keep the agents connected: their leaders stay verified.
    dashboard.fleet = fleet  # type: ignore[attr-defined]
    return prefix


async def run(dashboard: Dashboard, *, elections: int, repeat: int = 10) -> MapFigures:
    await build(dashboard, elections)
    api_token = dashboard.user("bench-map", "bench-map-password")
    session = session_cookie(dashboard.url, "bench-map", "bench-map-password")
    cookie = {"Cookie": f"sessionid={session}"}
    bearer = {"Authorization": f"Bearer {api_token}"}
    pages = [await asyncio.to_thread(_get, dashboard.url + "/", cookie) for _ in range(repeat)]
    apis = [
        await asyncio.to_thread(_get, dashboard.url + "/api/v1/elections", bearer)
        for _ in range(repeat)
    ]
    started, url, total = time.monotonic(), dashboard.url + "/api/v1/elections", 0
    while url:
        _, body = await asyncio.to_thread(_get, url, bearer)
        data = json.loads(body)
        total += len(data["elections"])
        url = dashboard.url + data["next"] if data["next"] else ""
    walked = time.monotonic() - started

    snapshots = []
    for _ in range(min(3, repeat)):
        browser = Browser(dashboard.url, session)
        opened = time.monotonic()
        await browser.open()
        # The snapshot ends with the page's pager (its last non-table part) and the rows.
        await browser.wait_for('id="pager"', 0, timeout=30)
        await browser.wait_for('<tbody id="election-rows"', 0, timeout=30)
        await asyncio.sleep(0.5)
        last = max(at for at, _ in browser.frames)
        snapshots.append((last - opened, browser.frames))
        await browser.close()
    for agent in getattr(dashboard, "fleet", []):
        await agent.close()
    frames = snapshots[-1][1]
    return MapFigures(
        elections=elections,
        page_seconds=median([t for t, _ in pages]),
        page_bytes=len(pages[-1][1]),
        api_seconds=median([t for t, _ in apis]),
        api_all_pages_seconds=walked,
        api_total=total,
        snapshot_seconds=median([t for t, _ in snapshots]),
        snapshot_frames=len(frames),
        largest_frame=max(len(text.encode()) for _, text in frames),
    )
