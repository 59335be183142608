"""How the conformance suite runs the ``nats`` backend (see tests/backends/conformance.py)."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
from typing import TYPE_CHECKING, Any

import nats

from agent.backends.nats import election_key

if TYPE_CHECKING:
    from agent.runner import ElectionRunner

SERVER_FIXTURE = "nats_url"
TTL = 2.0

#: Buckets the suite made, per server: deleted when the test session ends.
_BUCKETS: dict[str, set[str]] = {}


def bucket_for(election: str) -> str:
    """One bucket per election, so parallel tests (and their TTLs) never collide."""
    return "electorate-test-" + hashlib.sha256(election.encode()).hexdigest()[:20]


def options(server: str | None, election: str, index: int, n: int) -> dict[str, Any]:
    assert server is not None
    bucket = bucket_for(election)
    _BUCKETS.setdefault(server, set()).add(bucket)
    return {"url": server, "bucket": bucket, "splay": "50ms"}


async def remove_seat(server: str | None, election: str) -> None:
    """``nats kv del`` the election's key from outside: watching followers see the delete at
    once, while the leader hears of it only at its next renewal."""
    assert server is not None
    nc = await nats.connect(server, connect_timeout=2, max_reconnect_attempts=0)
    try:
        kv = await nc.jetstream(timeout=2).key_value(bucket_for(election))
        await kv.delete(election_key(election))
    finally:
        await nc.close()


async def cut_off(runner: ElectionRunner, server: str | None) -> None:
    """Close this agent's NATS connection under it: no resign, no reconnect.

    Its renewals then fail as transport errors, so it must demote itself when its lease runs
    out, which is before the server ages its key out and lets another candidate win.
    """
    nc = runner.backend._nc  # type: ignore[attr-defined]
    if nc is not None:
        await nc.close()


def forget_server(server: str) -> None:
    """A server the test removed itself (with its store): nothing to delete there at exit."""
    _BUCKETS.pop(server, None)


async def delete_buckets(server: str, buckets: set[str]) -> None:
    nc = await nats.connect(server, connect_timeout=2, max_reconnect_attempts=0)
    try:
        js = nc.jetstream(timeout=2)
        for bucket in buckets:
            with contextlib.suppress(Exception):
                await js.delete_key_value(bucket)
    finally:
        await nc.close()


@atexit.register
def _cleanup() -> None:
    for server, buckets in _BUCKETS.items():
        with contextlib.suppress(Exception):
            asyncio.run(asyncio.wait_for(delete_buckets(server, buckets), 10))
