"""A production-mode dashboard for the benchmarks: a fresh PostgreSQL database, the Redis
channel layer, and N daphne processes sharing one socket, started by supervisord with the
production configuration (``deploy/supervisord.conf``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from tests.helpers import free_port, repo_python

ROOT = Path(__file__).resolve().parents[1]
PG = os.environ.get("ELECTORATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("ELECTORATE_TEST_REDIS", "redis://127.0.0.1:6379/14").rsplit("/", 1)[0]


@dataclass
class Dashboard:
    url: str
    env: dict[str, str]
    database: str
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def ws_agent(self) -> str:
        return self.url.replace("http://", "ws://") + "/ws/agent/"

    def manage(self, *args: str, timeout: float = 600) -> str:
        done = subprocess.run(
            [repo_python(), "manage.py", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stderr[-3000:]}")
        return done.stdout

    def shell(self, code: str) -> str:
        return self.manage("shell", "-c", code)

    def agent_tokens(self, ids: list[str]) -> dict[str, str]:
        (self.workdir / "ids.json").write_text(json.dumps(ids))
        out = self.shell(
            "import json; from elections import actions; "
            f"ids = json.load(open({str(self.workdir / 'ids.json')!r})); "
            "print(json.dumps({a: actions.issue_agent_token(a, by='bench') for a in ids}))"
        )
        return json.loads(out.strip().splitlines()[-1])

    def user(self, username: str, password: str) -> str:
        """An operator login; returns an API token for it."""
        self.shell(
            "from django.contrib.auth.models import User, Group; "
            f"u, _ = User.objects.get_or_create(username={username!r}); "
            f"u.set_password({password!r}); u.save(); "
            "u.groups.add(Group.objects.get(name='operators'))"
        )
        return self.manage("create_api_token", username).strip()

    def pids(self) -> list[int]:
        """The server processes (supervisord's children)."""
        children: list[int] = []
        for proc in self.procs:
            for task in Path(f"/proc/{proc.pid}/task").glob("*/children"):
                children += [int(pid) for pid in task.read_text().split()]
        return children

    def stop(self) -> None:
        servers = self.pids()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()  # supervisord stops its daphne processes
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for pid in servers:  # none may outlive the bench
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')


def start(
    workdir: Path, *, processes: int = 2, extra_env: dict[str, str] | None = None
) -> Dashboard:
    workdir.mkdir(parents=True, exist_ok=True)
    name = "electorate_bench_" + secrets.token_hex(4)
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    env = {k: v for k, v in os.environ.items() if k not in ("DEBUG",)}
    env.update(
        PYTHONUNBUFFERED="1",
        DATABASE_URL=f"{PG.rsplit('/', 1)[0]}/{name}",
        REDIS_URL=f"{REDIS}/12",
        ELECTORATE_CHANNEL_PREFIX=name,
        SECRET_KEY="bench-" + secrets.token_hex(8),
        ELECTORATE_DATA_DIR=str(workdir),
        ELECTORATE_TICKER="1",  # no Celery beat in the bench: the sweep runs in-process
        LOG_LEVEL="WARNING",
        ELECTORATE_HTTPS="0",
        **(extra_env or {}),
    )
    port = free_port()
    env.update(
        ELECTORATE_WEB_PROCESSES=str(processes),
        ELECTORATE_BIND=f"tcp://127.0.0.1:{port}",
        PATH=f"{Path(repo_python()).parent}:{env.get('PATH', '')}",
    )
    dashboard = Dashboard(f"http://127.0.0.1:{port}", env, name, workdir)
    dashboard.manage("migrate", "--verbosity", "0")
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 - owned by the child
    dashboard.procs.append(
        subprocess.Popen(
            [
                str(Path(repo_python()).with_name("supervisord")),
                "-c",
                str(ROOT / "deploy" / "supervisord.conf"),
                "--pidfile",
                str(workdir / "supervisord.pid"),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            import urllib.request

            urllib.request.urlopen(dashboard.url + "/login/", timeout=2).read()
            return dashboard
        except OSError:
            if any(p.poll() is not None for p in dashboard.procs):
                break
            time.sleep(0.2)
    dashboard.stop()
    raise RuntimeError(f"the dashboard did not start:\n{(workdir / 'server.log').read_text()}")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes (and their threads)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def service_pids(name: str) -> list[int]:
    """Pids of a running service by its command name (postgres backends, redis-server)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine (all cores) so far."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")
