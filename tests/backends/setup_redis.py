"""Conformance plug-in for the ``redis`` backend (see tests/backends/test_conformance.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis

from tests.helpers import free_port

if TYPE_CHECKING:
    from agent.runner import ElectionRunner

SERVER_FIXTURE: str | None = "redis_url"
TTL = 1.0


def options(server: str | None, election: str, index: int, n: int) -> dict[str, Any]:
    assert server is not None
    # The key (and its :token and :events) derive from the election name, unique per test.
    return {"url": server}


async def cut_off(runner: ElectionRunner, server: str | None) -> None:
    """Make Redis unreachable for this runner: drop its connections without releasing the
    seat, and point it at a port where nothing listens. The key stays until its TTL, so the
    runner must demote on its own before then."""
    backend = runner.backend
    backend._url = f"redis://127.0.0.1:{free_port()}/14"  # type: ignore[attr-defined]
    await backend._drop()  # type: ignore[attr-defined]


async def cleanup(server: str | None, election: str) -> None:
    """Delete the election's seat and token keys (never FLUSHDB: the database is shared)."""
    assert server is not None
    client = Redis.from_url(server, socket_timeout=5)
    try:
        key = f"electorate:{election}"
        await client.delete(key, f"{key}:token", f"{key}:holder")
    finally:
        await client.aclose()


async def remove_seat(server: str | None, election: str) -> None:
    """``DEL`` the seat key from outside, as an operator (or a stray script) would: the key is
    gone at once, while the leader hears of it only at its next renewal."""
    assert server is not None
    client = Redis.from_url(server, socket_timeout=5)
    try:
        assert await client.delete(f"electorate:{election}") == 1, f"no seat for {election}"
    finally:
        await client.aclose()
