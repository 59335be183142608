"""Conformance plug-in for the ``postgres`` backend (see tests/backends/test_conformance.py)."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import psycopg

from tests.helpers import free_port

if TYPE_CHECKING:
    from agent.runner import ElectionRunner

SERVER_FIXTURE: str | None = "pg_dsn"
#: The leader's lease, and how long a winner waits out a predecessor that did not resign.
TTL = 1.0
CHECK_INTERVAL = 0.2


def lock_id_for(election: str) -> int:
    """A signed bigint per election, so parallel tests never share a lock."""
    digest = hashlib.blake2b(election.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def options(server: str | None, election: str, index: int, n: int) -> dict[str, Any]:
    assert server is not None
    return {
        "dsn": server,
        "lock_id": lock_id_for(election),
        "check_interval": f"{int(CHECK_INTERVAL * 1000)}ms",
    }


async def cut_off(runner: ElectionRunner, server: str | None) -> None:
    """Kill the runner's session on the server and keep it from reconnecting."""
    assert server is not None
    backend = runner.backend
    pid = backend.session_pid  # type: ignore[attr-defined]
    # Nothing listens on a fresh free port: every reconnect is refused.
    backend._dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"  # type: ignore[attr-defined]
    if pid is not None:
        async with await psycopg.AsyncConnection.connect(
            server, autocommit=True, connect_timeout=5
        ) as conn:
            await conn.execute("SELECT pg_terminate_backend(%s)", [pid])


async def cleanup(server: str | None, election: str) -> None:
    """Drop the election's fencing row (the shared table itself stays)."""
    assert server is not None
    async with await psycopg.AsyncConnection.connect(
        server, autocommit=True, connect_timeout=5
    ) as conn:
        await conn.execute("DELETE FROM electorate_fencing WHERE election = %s", [election])


async def remove_seat(server: str | None, election: str) -> None:
    """Terminate the leader's session from outside, as an admin's ``pg_terminate_backend``
    would: the server frees its lock at once, and the leader hears of it only at its next
    check."""
    assert server is not None
    async with await psycopg.AsyncConnection.connect(
        server, autocommit=True, connect_timeout=5
    ) as conn:
        cur = await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM electorate_fencing "
            "WHERE election = %s AND pid IS NOT NULL",
            [election],
        )
        assert await cur.fetchone(), f"no leader session recorded for {election}"
