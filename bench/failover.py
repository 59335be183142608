"""Failover time per backend, with real agent processes and their health endpoints.

    .venv/bin/python bench/failover.py [--backends raft,postgres,...] [--runs 5]

For each backend and run, a fresh election of three ``python -m agent run`` processes:
once the leader is settled (every follower names it), the leader is sent SIGKILL (crash: its
lease must lapse) or SIGTERM (it resigns on the way out), and the time until another agent's
``GET /health/leadership/<election>`` answers 200 is measured. PostgreSQL, Redis and NATS are
the running servers the tests use; etcd and moto (S3) are started here and stopped at the end.
The clusters and timing are those of the conformance suite (``tests.backends.conformance``).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import pytest  # tests.servers reports a missing server with pytest.fail

from agent.backends.registry import BACKENDS
from tests import servers
from tests.backends.conformance import Cluster, Target, load_setup

#: How long to wait for a settled leader (process start-up included) and for a failover.
SETTLE = 15.0
FAILOVER = 15.0
KINDS = {"kill": signal.SIGKILL, "resign": signal.SIGTERM}
#: Servers that run on this machine already (the same defaults and variables as the tests).
RUNNING = {"pg_dsn": servers.PG_DSN, "redis_url": servers.REDIS_URL, "nats_url": servers.NATS_URL}


class Servers:
    """Server URLs by the conformance fixture name; etcd and moto only when asked for."""

    def __init__(self) -> None:
        self.managed: dict[str, servers.Managed] = {}

    def url(self, fixture: str | None) -> str | None:
        if fixture is None:
            return None
        if fixture in RUNNING:
            url = RUNNING[fixture]
            servers.require_tcp(fixture, *servers._host_port(url, 0), "Is it running?")
            return url
        starters = {"etcd_url": servers.start_etcd, "s3_url": servers.start_moto}
        if fixture not in starters:
            raise ValueError(f"unknown server fixture {fixture!r}")
        if fixture not in self.managed:
            self.managed[fixture] = starters[fixture]()
        return self.managed[fixture].url

    def stop(self) -> None:
        for server in self.managed.values():
            server.stop()


async def measure(t: Target, kind: str, workdir: Path) -> float:
    cluster = Cluster(t, workdir)
    cluster.start()
    try:
        leader = await cluster.leader(SETTLE)
        elapsed, _ = await cluster.failover(leader, KINDS[kind], FAILOVER)
        return elapsed
    finally:
        await cluster.close()


def summary(values: list[float]) -> str:
    if not values:
        return f"{'-':>8} {'-':>8} {'-':>8}"
    return f"{statistics.median(values):8.3f} {min(values):8.3f} {max(values):8.3f}"


async def bench(names: list[str], runs: int) -> int:
    failures = 0
    rows: list[str] = []
    env = Servers()
    try:
        with tempfile.TemporaryDirectory(prefix="electorate-bench-") as tmp:
            for name in names:
                try:
                    setup = load_setup(name)
                    t = Target(name, setup, env.url(setup.SERVER_FIXTURE))
                    notifies = t.cls.notifies
                except (Exception, pytest.fail.Exception) as exc:
                    print(f"{name}: cannot set up: {exc}", file=sys.stderr)
                    failures += 1
                    continue
                times: dict[str, list[float]] = {kind: [] for kind in KINDS}
                for run in range(runs):
                    for kind in KINDS:
                        started = time.monotonic()
                        try:
                            value = await measure(t, kind, Path(tmp) / name / f"{kind}-{run}")
                        except AssertionError as exc:
                            print(f"{name} {kind} run {run + 1}: {exc}", file=sys.stderr)
                            failures += 1
                            continue
                        times[kind].append(value)
                        print(
                            f"{name:9} run {run + 1}/{runs} {kind:6} failover {value:6.3f}s "
                            f"(run took {time.monotonic() - started:.1f}s)",
                            file=sys.stderr,
                        )
                rows.append(
                    f"{name:9} {t.ttl:6.1f} {'yes' if notifies else 'no':>8}  "
                    f"{summary(times['kill'])}  {summary(times['resign'])}  "
                    f"{len(times['kill'])}/{len(times['resign'])}"
                )
    finally:
        env.stop()
    print()
    print(f"failover in seconds, {runs} run(s) each, 3 agents, measured at the health endpoint")
    print(
        f"{'backend':9} {'ttl':>6} {'notifies':>8}  "
        f"{'kill med':>8} {'min':>8} {'max':>8}  {'term med':>8} {'min':>8} {'max':>8}  ok"
    )
    print("\n".join(rows))
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help=f"comma-separated, from: {', '.join(BACKENDS)} (default: all)",
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per backend and kind")
    args = parser.parse_args()
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        parser.error(f"unknown backend(s): {', '.join(unknown)}")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return asyncio.run(bench(names, args.runs))


if __name__ == "__main__":
    sys.exit(main())
