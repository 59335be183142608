"""Real dashboard server processes for end-to-end tests (``manage.py runserver``, daphne).

Embedded mode: a fresh SQLite file and the in-memory channel layer, as ``make demo`` runs.
Production mode: a fresh PostgreSQL database and the Redis channel layer.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from tests.helpers import free_port
from tests.servers import PG_DSN, REDIS_URL, wait_tcp

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LiveDashboard:
    url: str
    env: dict[str, str]
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    cleanup: list[object] = field(default_factory=list)

    @property
    def ws_agent(self) -> str:
        return self.url.replace("http://", "ws://") + "/ws/agent/"

    def manage(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise AssertionError(f"manage.py {' '.join(args)} failed:\n{done.stderr}")
        return done.stdout

    def token(self, agent_id: str) -> str:
        return self.manage("create_agent_token", agent_id).strip()

    def get_json(self, path: str, session: str | None = None) -> object:
        import json

        request = urllib.request.Request(self.url + path)
        if session:
            request.add_header("Cookie", f"sessionid={session}")
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def log(self) -> str:
        path = self.workdir / "server.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_dashboard(workdir: Path, *, production: bool) -> LiveDashboard:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "DEBUG")}
    env.update(
        PYTHONUNBUFFERED="1",
        ELECTORATE_DATA_DIR=str(workdir),
        SECRET_KEY="test-" + secrets.token_hex(8),
        ELECTORATE_AGENT_STALE_AFTER="5",
        ELECTORATE_LIVE_COALESCE="0.05",
    )
    dashboard = LiveDashboard(url=f"http://127.0.0.1:{port}", env=env, workdir=workdir)
    if production:
        name = "electorate_live_" + secrets.token_hex(4)
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        base = PG_DSN.rsplit("/", 1)[0]
        env["DATABASE_URL"] = f"{base}/{name}"
        env["REDIS_URL"] = REDIS_URL.rsplit("/", 1)[0] + "/13"
        env["ELECTORATE_CHANNEL_PREFIX"] = name
        env["ELECTORATE_TICKER"] = "1"  # no beat in tests: the sweep runs in-process

        def drop() -> None:
            with psycopg.connect(PG_DSN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

        dashboard.cleanup.append(drop)
    else:
        env["DATABASE_URL"] = f"sqlite:///{workdir / 'dashboard.sqlite3'}"
    dashboard.manage("migrate", "--verbosity", "0")
    dashboard.proc = subprocess.Popen(
        [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
        cwd=ROOT,
        env=env,
        stdout=open(workdir / "server.log", "wb"),  # noqa: SIM115 - owned by the child
        stderr=subprocess.STDOUT,
    )
    wait_tcp("127.0.0.1", port, dashboard.proc, "the dashboard", timeout=30)
    return dashboard


def create_user(dashboard: LiveDashboard, username: str, password: str) -> None:
    dashboard.manage(
        "shell",
        "-c",
        "from django.contrib.auth import get_user_model as g; "
        f"u, _ = g().objects.get_or_create(username={username!r}); "
        f"u.set_password({password!r}); u.is_superuser = True; u.is_staff = True; u.save()",
    )


@contextlib.contextmanager
def demo_fleet(dashboard: LiveDashboard, directory: Path) -> Iterator[dict[str, subprocess.Popen]]:
    """The demo's three raft agents, as real processes, reporting to ``dashboard``."""
    from dashboard import demo

    tokens = {a: dashboard.token(a) for a in demo.AGENTS}
    ports = [free_port() for _ in range(len(demo.AGENTS) * 4)]
    agents = demo.write_fleet(directory, dashboard.ws_agent, tokens, ports)
    procs = {a.id: demo.start_agent(a, directory / f"{a.id}.log") for a in agents}
    try:
        yield procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="session")
def embedded_dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveDashboard]:
    dashboard = start_dashboard(tmp_path_factory.mktemp("embedded"), production=False)
    yield dashboard
    dashboard.stop()


@pytest.fixture(scope="session")
def production_dashboard(
    tmp_path_factory: pytest.TempPathFactory, pg_dsn: str, redis_url: str
) -> Iterator[LiveDashboard]:
    dashboard = start_dashboard(tmp_path_factory.mktemp("production"), production=True)
    yield dashboard
    dashboard.stop()
    time.sleep(0.2)
    for step in dashboard.cleanup:
        step()  # type: ignore[operator]


@pytest.fixture(scope="session", params=["embedded", "production"])
def dashboard(request: pytest.FixtureRequest) -> LiveDashboard:
    return request.getfixturevalue(f"{request.param}_dashboard")
