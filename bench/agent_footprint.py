"""Memory and CPU of one agent process holding many elections.

    .venv/bin/python bench/agent_footprint.py                    # raft, redis, mixed; 100 each
    .venv/bin/python bench/agent_footprint.py --scenarios raft --elections 100 --no-dashboard

For each scenario it writes a config, starts a real ``python -m agent run`` process, waits
until every election is settled (this single agent leads all of them; with a dashboard, the
link is connected and the spool is empty), then samples the process from ``/proc``: RSS
(``VmRSS``, and the peak ``VmHWM``) and CPU (utime + stime over ``--cpu-seconds`` of wall
time, as % of one core). A second process that only loads the same config and builds the
agent without starting it gives the share of RSS that is imports.

Scenarios (default ``raft,redis,mixed``): a backend's name runs every election on it (``raft``:
single-member elections on free ports, no server; ``redis``: keys in the test Redis, db 14),
``mixed`` goes round robin over all six backends. PostgreSQL, Redis and NATS are the running
test servers; etcd and moto (S3) are started here and stopped at the end. Every election has
``ttl = 5s`` and its backend's default intervals. With a dashboard (the default) a real
embedded one is started (``tests/live.py``) and the agent reports to it over its websocket.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import pytest  # tests.servers reports a missing server with pytest.fail

from tests import servers
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
TARGET_ONE_BACKEND_MB = 40.0
TARGET_MB = 50.0
SETTLE = 120.0
TTL = "5s"
MIXED = ("raft", "redis", "postgres", "nats", "etcd", "s3")
#: A backend's name runs 100 elections of it; ``mixed`` goes round robin over all six.
SCENARIOS = (*MIXED, "mixed")
DEFAULT = ("raft", "redis", "mixed")


class Env:
    """Servers the scenarios need; etcd and moto are started on first use and stopped at the end."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.managed: dict[str, servers.Managed] = {}
        self.ports: set[int] = set()

    def server(self, name: str) -> str:
        running = {"redis": servers.REDIS_URL, "postgres": servers.PG_DSN, "nats": servers.NATS_URL}
        if name in running:
            url = running[name]
            servers.require_tcp(name, *servers._host_port(url, 0), "Is it running?")
            return url
        if name not in self.managed:
            start = {"etcd": servers.start_etcd, "s3": servers.start_moto}[name]
            self.managed[name] = start()
        return self.managed[name].url

    def port(self) -> int:
        """A free port not handed out before in this run (the kernel may repeat itself)."""
        while (port := free_port()) in self.ports:
            pass
        self.ports.add(port)
        return port

    def options(self, backend: str, index: int) -> dict[str, Any]:
        """One election's backend options, unique to this run so nothing shared collides."""
        tag = f"electorate-bench-{self.run}"
        if backend == "raft":
            return {"listen": f"127.0.0.1:{self.port()}", "secret": f"{tag}-secret"}
        if backend == "redis":
            return {"url": self.server("redis"), "key": f"{tag}:{index}"}
        if backend == "postgres":
            return {"dsn": self.server("postgres"), "lock_id": int(self.run, 16) * 1000 + index}
        if backend == "nats":
            return {"url": self.server("nats"), "bucket": tag, "key": f"e{index}"}
        if backend == "etcd":
            return {"endpoints": [self.server("etcd")], "key": f"/{tag}/{index}"}
        if backend == "s3":
            return {"endpoint": self.server("s3"), "bucket": tag, "key": f"e{index}"}
        raise ValueError(backend)

    def cleanup(self, backends: set[str]) -> None:
        """Remove what this run left in the shared servers (never a flush: they are shared)."""
        tag = f"electorate-bench-{self.run}"
        if "redis" in backends:
            from redis import Redis

            client = Redis.from_url(servers.REDIS_URL, socket_timeout=5)
            keys = list(client.scan_iter(f"{tag}:*"))
            if keys:
                client.delete(*keys)
            client.close()
        if "postgres" in backends:
            import psycopg

            with psycopg.connect(servers.PG_DSN, autocommit=True) as conn:
                conn.execute("DELETE FROM electorate_fencing WHERE election LIKE %s", [f"{tag}/%"])
        if "nats" in backends:
            import nats

            async def drop() -> None:
                nc = await nats.connect(servers.NATS_URL, connect_timeout=2)
                with contextlib.suppress(Exception):
                    await nc.jetstream(timeout=2).delete_key_value(tag)
                await nc.close()

            asyncio.run(drop())

    def stop(self) -> None:
        for server in self.managed.values():
            server.stop()


def write_config(
    directory: Path, env: Env, backends: list[str], dashboard: str | None, token: str | None
) -> tuple[Path, int]:
    health = env.port()
    lines = ["[agent]", f'id = "bench-{env.run}"', f'health = "127.0.0.1:{health}"']
    lines.append('spool = "agent.spool"')
    if dashboard and token:
        (directory / "agent.token").write_text(token)
        lines += [f'dashboard = "{dashboard}"', 'token_file = "agent.token"']
    for i, backend in enumerate(backends):
        lines += ["", "[[election]]", f'name = "electorate-bench-{env.run}/{i}"']
        lines += [f'backend = "{backend}"', f'ttl = "{TTL}"']
        for key, value in env.options(backend, i).items():
            lines.append(f"{key} = {json.dumps(value)}")
    path = directory / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path, health


def proc_status(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_ticks(pid: int) -> int:
    # Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


def health(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return None


def settled(status: dict[str, Any] | None, with_dashboard: bool) -> bool:
    if not status:
        return False
    if any(e["state"] != "leader" for e in status["elections"].values()):
        return False
    if with_dashboard:
        return status["dashboard"]["connected"] and status["spool"]["pending"] == 0
    return True


def unsettled(status: dict[str, Any] | None) -> str:
    if not status:
        return "no answer from /health"
    waiting = {n: e for n, e in status["elections"].items() if e["state"] != "leader"}
    return json.dumps({"dashboard": status["dashboard"], "spool": status["spool"], **waiting})[
        :2000
    ]


def import_rss(config: Path) -> tuple[int, int]:
    """RSS (kB) and module count of a process that loads ``config`` and builds the agent."""
    code = (
        "import sys\n"
        "from agent.config import load_config\n"
        "from agent.service import Agent\n"
        f"agent = Agent(load_config({str(config)!r}))\n"
        "rss = [l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]\n"
        "print(rss, len(sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    rss, modules = done.stdout.split()
    return int(rss), int(modules)


@contextlib.contextmanager
def agent_process(config: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(config), "--log-level", "WARNING"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),  # noqa: SIM115 - owned by the child
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def measure(
    name: str,
    backends: list[str],
    env: Env,
    directory: Path,
    dashboard: Any,
    cpu_seconds: float,
) -> dict[str, Any]:
    directory.mkdir(parents=True)
    token = dashboard.token(f"bench-{env.run}") if dashboard else None
    url = dashboard.ws_agent if dashboard else None
    config, port = write_config(directory, env, backends, url, token)
    imports_kb, modules = import_rss(config)
    log = directory / "agent.log"
    with agent_process(config, log) as proc:
        started = time.monotonic()
        status = None
        while not settled(status, dashboard is not None):
            if proc.poll() is not None:
                raise RuntimeError(f"the agent exited ({proc.returncode}):\n{log.read_text()}")
            if time.monotonic() - started > SETTLE:
                raise RuntimeError(f"not settled within {SETTLE}s: {unsettled(status)}")
            time.sleep(0.5)
            status = health(port)
        settle = time.monotonic() - started
        time.sleep(2)  # let the start-up garbage settle before sampling
        ticks, wall = cpu_ticks(proc.pid), time.monotonic()
        time.sleep(cpu_seconds)
        ticks, wall = cpu_ticks(proc.pid) - ticks, time.monotonic() - wall
        cpu = 100.0 * ticks / os.sysconf("SC_CLK_TCK") / wall
        rss, peak = proc_status(proc.pid, "VmRSS"), proc_status(proc.pid, "VmHWM")
        threads = proc_status(proc.pid, "Threads")
    return {
        "name": name if name != "mixed" else f"mixed({len(set(backends))})",
        "elections": len(backends),
        "backends": sorted(set(backends)),
        "settle": settle,
        "rss": rss / 1024,
        "peak": peak / 1024,
        "imports": imports_kb / 1024,
        "modules": modules,
        "threads": threads,
        "cpu": cpu,
    }


def run_scenarios(
    names: list[str],
    elections: int,
    cpu_seconds: float,
    *,
    with_dashboard: bool = True,
    mix: tuple[str, ...] = MIXED,
) -> tuple[list[dict[str, Any]], int]:
    """Measure each scenario in turn; the rows, and how many scenarios failed."""
    run = uuid.uuid4().hex[:8]
    env = Env(run)
    rows: list[dict[str, Any]] = []
    failures = 0
    used: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="electorate-footprint-") as tmp:
        dashboard = None
        try:
            if with_dashboard:
                from tests.live import start_dashboard

                dashboard = start_dashboard(Path(tmp) / "dashboard", production=False)
            for name in names:
                pool = mix if name == "mixed" else (name,)
                backends = [pool[i % len(pool)] for i in range(elections)]
                used.update(backends)
                print(f"{name}: starting {elections} elections...", file=sys.stderr)
                try:
                    workdir = Path(tmp) / name
                    row = measure(name, backends, env, workdir, dashboard, cpu_seconds)
                except (RuntimeError, pytest.fail.Exception) as exc:
                    print(f"{name}: {exc}", file=sys.stderr)
                    failures += 1
                    continue
                rows.append(row)
        finally:
            if dashboard:
                dashboard.stop()
            try:
                env.cleanup(used)
            finally:
                env.stop()
    return rows, failures


def target_mb(row: dict[str, Any]) -> float:
    return TARGET_ONE_BACKEND_MB if len(row["backends"]) == 1 else TARGET_MB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenarios", default=",".join(DEFAULT), help=f"from {', '.join(SCENARIOS)}"
    )
    parser.add_argument("--elections", type=int, default=100)
    parser.add_argument("--cpu-seconds", type=float, default=20.0)
    parser.add_argument("--no-dashboard", action="store_true", help="run without a dashboard")
    parser.add_argument(
        "--mix", default=",".join(MIXED), help="the backends of the mixed scenario (default: all)"
    )
    args = parser.parse_args()
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    mix = tuple(n.strip() for n in args.mix.split(",") if n.strip())
    if unknown := [n for n in names if n not in SCENARIOS]:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    if unknown := [n for n in mix if n not in MIXED]:
        parser.error(f"unknown backend(s) in --mix: {', '.join(unknown)}")

    rows, failures = run_scenarios(
        names, args.elections, args.cpu_seconds, with_dashboard=not args.no_dashboard, mix=mix
    )
    print()
    print(
        f"one agent process, ttl {TTL}, backend default intervals, "
        f"{'no dashboard' if args.no_dashboard else 'reporting to a real dashboard'}; "
        f"CPU over {args.cpu_seconds:.0f}s"
    )
    print(
        f"{'scenario':9} {'elections':>9} {'settle s':>8} {'RSS MB':>7} {'peak MB':>7} "
        f"{'imports MB':>10} {'modules':>7} {'threads':>7} {'CPU %':>6}  target"
    )
    for row in rows:
        target = target_mb(row)
        verdict = "ok" if row["rss"] < target else "OVER"
        print(
            f"{row['name']:9} {row['elections']:9d} {row['settle']:8.1f} {row['rss']:7.1f} "
            f"{row['peak']:7.1f} {row['imports']:10.1f} {row['modules']:7d} {row['threads']:7d} "
            f"{row['cpu']:6.1f}  RSS < {target:.0f} MB: {verdict}"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
