"""Small helpers shared by tests (no fixtures here: see conftest.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

import protocol
from agent.backends.base import Backend, Lease
from agent.config import ConfigError, build_config

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]


def repo_python() -> str:
    """The checkout's own virtualenv Python when it has one (agents and servers run as they
    are deployed), else the one running the tests."""
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


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


@contextlib.asynccontextmanager
async def opened(*backends: Backend) -> AsyncIterator[None]:
    """Open each backend in turn; close them all, in the same order, when the block ends."""
    for backend in backends:
        await backend.open()
    try:
        yield
    finally:
        for backend in backends:
            await backend.close()


async def campaign_won(backend: Backend) -> Lease:
    """Campaign once where the seat is free: the lease it must win."""
    lease = await backend.campaign()
    assert lease is not None
    return lease


def refused_options(tmp_path: Path, backend: str, ttl: str, options: dict[str, Any]) -> ConfigError:
    """The error an election ``db`` on ``backend`` with these options is refused with."""
    raw = {"election": [{"name": "db", "backend": backend, "ttl": ttl, **options}]}
    with pytest.raises(ConfigError) as info:
        build_config(raw, tmp_path / "agent.toml")
    return info.value


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
