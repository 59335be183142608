"""The demo fleet: three local agents holding three Raft-style elections among themselves.

Used by ``manage.py demo`` and by the end-to-end tests, so both run the same fleet.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

ELECTIONS = [
    # name, labels, members that may not vote (by index)
    ("billing/cluster", {"cluster": "eu-1"}, set()),
    ("search/shard-1", {"cluster": "eu-1", "shard": "1"}, set()),
    ("search/shard-2", {"cluster": "eu-1", "shard": "2"}, {2}),
]
AGENTS = ["web-1", "web-2", "web-3"]


@dataclass
class DemoAgent:
    id: str
    config: Path
    health: int


def write_fleet(
    directory: Path,
    dashboard_ws: str,
    tokens: dict[str, str],
    ports: list[int],
    *,
    heartbeat: str = "1s",
) -> list[DemoAgent]:
    """Write one TOML config and token file per agent, and one secret file per election;
    ``ports`` needs 3 + 3*3 free ports."""
    directory.mkdir(parents=True, exist_ok=True)
    health_ports, raft_ports = ports[: len(AGENTS)], ports[len(AGENTS) :]
    # One shared secret per election: the raft members authenticate each other with it.
    secret_files = {}
    for name, _, _ in ELECTIONS:
        secret_file = directory / f"{name.replace('/', '-')}.secret"
        secret_file.write_text(secrets.token_urlsafe(32) + "\n")
        secret_file.chmod(0o600)
        secret_files[name] = secret_file.name
    agents = []
    for i, agent_id in enumerate(AGENTS):
        token_file = directory / f"{agent_id}.token"
        token_file.write_text(tokens[agent_id] + "\n")
        token_file.chmod(0o600)
        lines = [
            "[agent]",
            f'id = "{agent_id}"',
            f'dashboard = "{dashboard_ws}"',
            f'token_file = "{token_file.name}"',
            f'spool = "{agent_id}.spool"',
            f'health = "127.0.0.1:{health_ports[i]}"',
            f'heartbeat = "{heartbeat}"',
            "",
        ]
        for e, (name, labels, no_vote) in enumerate(ELECTIONS):
            addresses = [raft_ports[e * len(AGENTS) + j] for j in range(len(AGENTS))]
            peers = ", ".join(
                f'{{ address = "127.0.0.1:{p}", no_vote = {str(j in no_vote).lower()} }}'
                for j, p in enumerate(addresses)
            )
            label_text = ", ".join(f'{k} = "{v}"' for k, v in labels.items())
            lines += [
                "[[election]]",
                f'name = "{name}"',
                'backend = "raft"',
                'ttl = "1s"',
                f"labels = {{ {label_text} }}",
                f'listen = "127.0.0.1:{addresses[i]}"',
                f"peers = [{peers}]",
                f'secret_file = "{secret_files[name]}"',
                'heartbeat = "150ms"',
                'election_timeout = "700ms"',
                f"no_vote = {str(i in no_vote).lower()}",
                "",
            ]
        config = directory / f"{agent_id}.toml"
        config.write_text("\n".join(lines))
        agents.append(DemoAgent(agent_id, config, health_ports[i]))
    return agents


def start_agent(agent: DemoAgent, log: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(agent.config)],
        cwd=BASE_DIR,
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
