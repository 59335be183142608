"""Small helpers shared by tests (no fixtures here: see conftest.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

import protocol

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def eventually(
    check: Callable[[], object], timeout: float = 10.0, interval: float = 0.02
) -> object:
    """Poll ``check`` until it returns something truthy; fail with the last value."""
    deadline = time.monotonic() + timeout
    value: object = None
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")


def hello(agent: str, *names: str) -> protocol.Hello:
    """A hello announcing raft elections ``names`` (ttl 1 s), as parsed by the dashboard."""
    return protocol.Hello(
        agent=agent,
        elections=[protocol.ElectionInfo(name=n, backend="raft", ttl=1) for n in names],
    )


def parsed_event(*args: Any, **kwargs: Any) -> protocol.Event:
    """``event(...)`` as the dashboard's validation hands it on."""
    return protocol.Event.model_validate(event(*args, **kwargs))


def event(seq: int, election: str, to: str = "leader", token: int = 1, **extra: Any) -> dict:
    """One ``events`` item as an agent sends it (JSON-ready)."""
    return {
        "seq": seq,
        "election": election,
        "from": extra.pop("from_", "candidate"),
        "to": to,
        "token": token,
        "leader": extra.pop("leader", None),
        "at": extra.pop("at", datetime.now(UTC)).isoformat(),
        **extra,
    }


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end from synchronous code, even inside a running event loop
    (Playwright's sync API runs one), on a thread of its own."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
