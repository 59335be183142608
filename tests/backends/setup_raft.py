"""Conformance plug-in for the Raft-style backend: no server, the agents talk to each other."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from tests.helpers import free_port

if TYPE_CHECKING:
    from agent.runner import ElectionRunner

SERVER_FIXTURE: str | None = None
#: The runner's call bound; the real lease is election_timeout (0.4 s), so failover is < 1 s.
TTL = 1.0

#: Every agent of one election must agree on the peers list, so ports are chosen once per name.
_ports: dict[str, list[int]] = {}


def options(server: str | None, election: str, index: int, n: int) -> dict[str, Any]:
    ports = _ports.setdefault(election, [free_port() for _ in range(n)])
    if len(ports) != n:
        raise ValueError(f"election {election!r} was set up for {len(ports)} agents, not {n}")
    return {
        "listen": f"127.0.0.1:{ports[index]}",
        "peers": [f"127.0.0.1:{port}" for port in ports],
        "heartbeat": "100ms",
        "election_timeout": "400ms",
        "secret": f"conformance secret of {election}",
    }


async def cut_off(runner: ElectionRunner, server: str | None) -> None:
    """Partition the node: it neither hears its peers nor reaches them any more."""
    node = runner.backend.node  # type: ignore[attr-defined]

    async def unreachable(address: tuple[str, int], message: dict[str, Any]) -> None:
        return None

    # Closing the server alone is not enough: a leader's outgoing heartbeats would still be
    # acked and keep its lease alive.
    node._rpc = unreachable
    if node._server is not None:
        node._server.close()
        # Connections already accepted would otherwise keep answering.
        with contextlib.suppress(AttributeError):
            node._server.close_clients()
