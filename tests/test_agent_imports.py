"""An agent loads the client library of the backends it uses, and no other."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent

#: Top-level packages that only some agents need.
CLIENTS = {
    "boto3",
    "botocore",
    "nats",
    "psycopg",
    "aetcd",
    "grpc",
    "redis",
    "websockets",
    "prometheus_client",
    "django",
}

#: Starts a real agent in a fresh interpreter, waits until it leads every election, and prints
#: the top-level packages it has imported.
STARTED = """
import asyncio, json, sys
from agent.config import load_config
from agent.service import Agent

async def main() -> None:
    agent = Agent(load_config(sys.argv[1]))
    await agent.start()
    try:
        for _ in range(500):
            if all(r.is_leader() for r in agent.runners.values()):
                break
            await asyncio.sleep(0.02)
        else:
            raise SystemExit("no election was won")
        print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
    finally:
        await agent.stop()

asyncio.run(main())
"""


def started_packages(config: Path) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", STARTED, str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


def write(tmp_path: Path, elections: str, agent: str = "") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'[agent]\nid = "imports-1"\nspool = "agent.spool"\n{agent}\n{elections}')
    return path


def raft(name: str) -> str:
    return (
        f'[[election]]\nname = "{name}"\nbackend = "raft"\n'
        f'listen = "127.0.0.1:{free_port()}"\nheartbeat = "50ms"\nelection_timeout = "200ms"\n'
        'secret = "imports-test-secret"\n'
    )


def test_a_raft_agent_imports_no_client_library(tmp_path: Path) -> None:
    config = write(
        tmp_path, raft("imports/a") + raft("imports/b"), f'health = "127.0.0.1:{free_port()}"'
    )
    assert started_packages(config) & CLIENTS == set()

    # `check` too: it validates each backend's options, so it imports the backends named.
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "agent", "check", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    imported = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "agent" in imported and "pydantic" in imported  # the listing is not empty
    assert imported & CLIENTS == set()


def test_an_agent_imports_the_client_of_the_backend_it_uses(tmp_path: Path, redis_url: str) -> None:
    """The same check sees a client library when one is configured: it is not vacuous."""
    redis = f'[[election]]\nname = "imports/redis-{free_port()}"\nbackend = "redis"\n'
    redis += f'url = "{redis_url}"\n'
    packages = started_packages(write(tmp_path, raft("imports/c") + redis))
    assert packages & CLIENTS == {"redis"}
