"""Simulated agents that speak the real protocol over real websockets (no shortcut through
the ORM), and a browser's live socket, for the fleet benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar
import json
import statistics
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from bench.server import Dashboard


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def woken(event: asyncio.Event, deadline: float, longest: float) -> bool:
    """Clear ``event`` and wait for it, ``longest`` seconds at the most; False, without
    waiting, once the monotonic ``deadline`` has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        return False
    event.clear()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), min(left, longest))
    return True


class _Socket:
    """A websocket and the task that reads it."""

    ws: ClientConnection | None
    _reader: asyncio.Task[None] | None

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()


@dataclass
class SimAgent(_Socket):
    """One agent: a hello naming its elections, then events and heartbeats as it is told."""

    url: str
    id: str
    token: str
    elections: list[str]
    labels: dict[str, str] = field(default_factory=dict)
    ws: ClientConnection | None = None
    seq: int = 0
    acked: int = 0
    #: seq -> monotonic send time, until acked.
    sent_at: dict[int, float] = field(default_factory=dict)
    ack_latencies: list[float] = field(default_factory=list)
    #: When the last ack arrived (monotonic; 0: none yet).
    last_ack_at: float = 0.0
    errors: list[str] = field(default_factory=list)
    _acked: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        self.ws = await connect(
            self.url,
            additional_headers={"Authorization": f"Bearer {self.token}"},
            open_timeout=60,
            ping_interval=None,
            max_queue=None,
        )
        hello = {
            "type": "hello",
            "agent": self.id,
            "hostname": "bench",
            "version": "bench",
            "elections": [
                {"name": n, "backend": "raft", "ttl": 3, "labels": self.labels}
                for n in self.elections
            ],
            "last_seq": self.seq,
        }
        await self.ws.send(json.dumps(hello))
        answer = json.loads(await asyncio.wait_for(self.ws.recv(), 60))
        if answer.get("type") != "ack":
            raise RuntimeError(f"{self.id}: hello answered {answer}")
        self.seq = self.acked = max(self.seq, answer["seq"])
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for text in self.ws:
                message = json.loads(text)
                if message.get("type") == "ack":
                    now = time.monotonic()
                    for seq in [s for s in self.sent_at if s <= message["seq"]]:
                        self.ack_latencies.append(now - self.sent_at.pop(seq))
                    self.acked = max(self.acked, message["seq"])
                    self.last_ack_at = now
                    self._acked.set()
                elif message.get("type") == "error":
                    self.errors.append(f"{message['code']}: {message['message']}")
        except Exception as exc:  # the socket closed: say so in the figures
            self.errors.append(f"socket: {exc}")

    def event(self, election: str, to: str, token: int | None, leader: str | None) -> dict:
        self.seq += 1
        return {
            "seq": self.seq,
            "election": election,
            "from": "candidate" if to == "leader" else "leader",
            "to": to,
            "token": token,
            "leader": leader,
            "at": datetime.now(UTC).isoformat(),
        }

    async def send_events(self, items: list[dict]) -> None:
        assert self.ws is not None
        now = time.monotonic()
        for item in items:
            self.sent_at[item["seq"]] = now
        await self.ws.send(json.dumps({"type": "events", "items": items}))

    async def lead(self, election: str, token: int) -> None:
        await self.send_events([self.event(election, "leader", token, self.id)])

    async def heartbeat(self, states: dict[str, dict[str, Any]]) -> None:
        assert self.ws is not None
        await self.ws.send(
            json.dumps({"type": "heartbeat", "at": datetime.now(UTC).isoformat(), "states": states})
        )

    async def drained(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.acked < self.seq:
            if not await woken(self._acked, deadline, 1.0):
                return False
        return True


async def connect_all(agents: list[SimAgent], concurrency: int = 50) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(agent: SimAgent) -> None:
        async with gate:
            await agent.connect()

    await asyncio.gather(*(one(a) for a in agents))


async def connected_fleet(
    dashboard: Dashboard, prefix: str, agents: int, elections: Callable[[str], list[str]]
) -> list[SimAgent]:
    """``agents`` agents with ids ``<prefix>-<n>``, each a member of the elections
    ``elections(its id)`` names, with tokens from ``dashboard``: connected."""
    ids = [f"{prefix}-{i:05d}" for i in range(agents)]
    tokens = dashboard.agent_tokens(ids)
    fleet = [SimAgent(dashboard.ws_agent, a, tokens[a], elections(a)) for a in ids]
    await connect_all(fleet)
    return fleet


def session_cookie(base: str, username: str, password: str) -> str:
    """Log in through the form as a browser does; the session cookie."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener.open(base + "/login/", timeout=30).read()
    csrf = next(c.value for c in jar if c.name == "csrftoken")
    form = urllib.parse.urlencode(
        {"username": username, "password": password, "csrfmiddlewaretoken": csrf}
    ).encode()
    request = urllib.request.Request(
        base + "/login/", data=form, headers={"Referer": base + "/login/"}
    )
    opener.open(request, timeout=30).read()
    return next(c.value for c in jar if c.name == "sessionid")


@dataclass
class Browser(_Socket):
    """A browser's live socket that acks every frame, as the page's script does."""

    base: str
    session: str
    query: str = ""
    ws: ClientConnection | None = None
    applied: int = 0
    frames: list[tuple[float, str]] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None
    _new: asyncio.Event = field(default_factory=asyncio.Event)

    async def open(self) -> None:
        self.ws = await connect(
            self.base.replace("http://", "ws://")
            + "/ws/live/"
            + (f"?{self.query}" if self.query else ""),
            additional_headers={"Cookie": f"sessionid={self.session}", "Origin": self.base},
            max_size=2**20,  # the server's own limit: a bigger frame fails here as in a browser
            open_timeout=60,
            ping_interval=None,
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.ws is not None
        async for text in self.ws:
            self.frames.append((time.monotonic(), text))
            self.applied += 1
            await self.ws.send(json.dumps({"ack": self.applied}))
            self._new.set()

    async def wait_for(self, wanted: str, since: int, timeout: float) -> float | None:
        """Monotonic time of the first frame after index ``since`` containing ``wanted``."""
        deadline = time.monotonic() + timeout
        index = since
        while True:
            while index < len(self.frames):
                at, text = self.frames[index]
                index += 1
                if wanted in text:
                    return at
            if not await woken(self._new, deadline, 0.5):
                return None
