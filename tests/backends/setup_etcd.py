"""Conformance plug-in for the etcd backend (see tests/backends/conformance.py)."""

from __future__ import annotations

import asyncio
import json
import shutil
from typing import TYPE_CHECKING, Any

from tests.helpers import free_port

if TYPE_CHECKING:
    from agent.runner import ElectionRunner

SERVER_FIXTURE = "etcd_url"
#: etcd grants leases in whole seconds, 2 s at least on a default single-member cluster.
TTL = 2.0


def options(server: str | None, election: str, index: int, n: int) -> dict[str, Any]:
    return {"endpoints": [server], "key": f"/electorate-test/{election}"}


async def cut_off(runner: ElectionRunner, server: str | None) -> None:
    """Make etcd unreachable for this runner only: close its channel, point it at a dead port.

    Revoking its lease from outside would delete the key at once and let a watching follower
    win before the old leader's next keep-alive can tell it (that case is pinned on its own in
    test_etcd.py); a partition is the case where the old leader must fence itself first.
    """
    backend = runner.backend
    backend._endpoints = [("127.0.0.1", free_port())]  # type: ignore[attr-defined]
    backend._endpoint = 0  # type: ignore[attr-defined]
    await backend._drop_client()  # type: ignore[attr-defined]


async def remove_seat(server: str | None, election: str) -> None:
    """Revoke the leader's etcd lease with ``etcdctl``, as an operator would: etcd deletes the
    key at once, which wakes every watching follower, while the leader hears of it only when
    it next asks."""
    assert server is not None
    key = options(server, election, 0, 1)["key"]
    value = await etcdctl(server, "get", key, "--print-value-only")
    lease = json.loads(value)["lease"]
    await etcdctl(server, "lease", "revoke", lease)


async def etcdctl(server: str, *args: str) -> str:
    binary = shutil.which("etcdctl")
    assert binary, "etcdctl is not installed (Debian's etcd-client)"
    proc = await asyncio.create_subprocess_exec(
        binary,
        "--endpoints",
        server,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=10)
    assert proc.returncode == 0, f"etcdctl {' '.join(args)}: {err.decode()}"
    return out.decode()
