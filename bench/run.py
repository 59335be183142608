"""``make bench``: the fleet benchmarks against a production-mode server on this machine,
with real websocket clients, printed as one table with each figure beside its target.

    .venv/bin/python bench/run.py                     # everything (about 20 minutes)
    .venv/bin/python bench/run.py --only ingest,map   # some parts
    .venv/bin/python bench/run.py --quick             # tiny sizes: checks the benches run

Each part starts its own dashboard (a fresh PostgreSQL database, the Redis channel layer,
``--processes`` daphne processes sharing one socket) and stops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench import heartbeats, ingest, latency, mapsize, server, stepdown


@dataclass
class Row:
    figure: str
    measured: str
    target: str
    ok: bool | None


@dataclass(frozen=True)
class Sizes:
    ingest_agents: tuple[int, ...]
    ingest_rate: float
    ingest_seconds: float
    heartbeat_agents: int
    heartbeat_seconds: float
    latency_agents: tuple[int, ...]
    latency_samples: int
    map_elections: int
    stepdown_runs: int
    repeat: int = 10
    #: Transitions a frame in the burst row of the ingest part.
    ingest_batch: int = 10
    #: A load one server carries (single-transition frames): ack latency when not overloaded.
    ingest_sustained_rate: float = 500.0
    agent_elections: int = 100
    agent_cpu_seconds: float = 20.0
    #: One backend with a server, one without, and all six at once.
    agent_scenarios: tuple[str, ...] = ("raft", "redis", "mixed")


FULL = Sizes((100, 1000), 5000.0, 20.0, 5000, 30.0, (1, 100, 1000), 200, 5000, 5)
QUICK = Sizes(
    (5,),
    50.0,
    2.0,
    20,
    3.0,
    (2,),
    5,
    120,
    1,
    repeat=2,
    ingest_batch=3,
    ingest_sustained_rate=20.0,
    agent_elections=5,
    agent_cpu_seconds=2,
)
PARTS = ("ingest", "heartbeats", "latency", "map", "stepdown", "agent")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


async def with_dashboard(
    workdir: Path, processes: int, body: Callable[[server.Dashboard], Awaitable[list[Row]]]
) -> list[Row]:
    dashboard = await asyncio.to_thread(server.start, workdir, processes=processes)
    try:
        return await body(dashboard)
    finally:
        await asyncio.to_thread(dashboard.stop)


def _once(f: ingest.IngestFigures) -> str:
    if f.exactly_once:
        return "exactly once"
    return (
        f"NOT exactly once: stored {f.stored} of {f.sent}, {f.duplicates} twice, "
        f"{f.unacked} unacked {ingest.DRAIN:.0f} s after the load ended"
    )


async def part_ingest(d: server.Dashboard, sizes: Sizes) -> list[Row]:
    most = max(sizes.ingest_agents)
    runs = [(agents, 1, sizes.ingest_rate) for agents in sizes.ingest_agents]
    runs.append((most, sizes.ingest_batch, sizes.ingest_rate))
    runs.append((most, 1, sizes.ingest_sustained_rate))
    rows = []
    for agents, batch, rate in runs:
        f = await ingest.run(d, agents=agents, rate=rate, seconds=sizes.ingest_seconds, batch=batch)
        shape = "a transition a frame" if batch == 1 else f"bursts of {batch} a frame"
        rows.append(
            Row(
                f"ingest, {agents} agents, {shape}, {rate:.0f}/s offered",
                f"{f.per_second:.0f}/s acked; ack p50 {ms(f.ack_p50)}, p99 {ms(f.ack_p99)}; "
                + _once(f),
                ">= 5,000/s, p99 < 250 ms, exactly once",
                f.per_second >= 5000 and f.ack_p99 < 0.25 and f.exactly_once,
            )
        )
    return rows


async def part_heartbeats(d: server.Dashboard, sizes: Sizes) -> list[Row]:
    f = await heartbeats.run(d, agents=sizes.heartbeat_agents, seconds=sizes.heartbeat_seconds)
    return [
        Row(
            f"heartbeats, {f.agents} agents, one per 3 s ({f.per_second:.0f}/s)",
            f"dashboard {f.server_cores:.2f} cores, with PostgreSQL and Redis "
            f"{f.total_cores:.2f} of 2; {f.transactions_per_heartbeat:.3f} transactions a beat",
            "server under half busy (< 1.0 of 2 cores)",
            f.total_cores < 1.0 and f.errors == 0,
        )
    ]


async def part_latency(d: server.Dashboard, sizes: Sizes) -> list[Row]:
    rows = []
    for agents in sizes.latency_agents:
        f = await latency.run(d, agents=agents, samples=sizes.latency_samples)
        rows.append(
            Row(
                f"event -> live frame, {agents} agents connected",
                f"p50 {ms(f.p50)}, p99 {ms(f.p99)}"
                + (f"; {f.missed} of {f.samples} missed" if f.missed else ""),
                "p99 < 250 ms",
                f.p99 < 0.25 and not f.missed,
            )
        )
    return rows


async def part_map(d: server.Dashboard, sizes: Sizes) -> list[Row]:
    f = await mapsize.run(d, elections=sizes.map_elections, repeat=sizes.repeat)
    n = f"{f.elections:,} elections"
    return [
        Row(
            f"GET / at {n}",
            f"{ms(f.page_seconds)}, {f.page_bytes / 1024:.0f} KiB",
            "< 200 ms",
            f.page_seconds < 0.2,
        ),
        Row(
            f"GET /api/v1/elections at {n}",
            f"{ms(f.api_seconds)} a page of 500; all "
            f"{f.api_total:,} in {f.api_all_pages_seconds:.2f} s",
            "< 200 ms",
            f.api_seconds < 0.2 and f.api_total == f.elections,
        ),
        Row(
            f"live snapshot at {n}",
            f"{ms(f.snapshot_seconds)}, {f.snapshot_frames} frames, "
            f"largest {f.largest_frame / 1024:.0f} KiB",
            "works; no frame over 1 MiB",
            f.largest_frame <= 2**20,
        ),
    ]


async def part_stepdown(d: server.Dashboard, sizes: Sizes, workdir: Path) -> list[Row]:
    from agent.backends.registry import BACKENDS
    from bench.failover import Servers
    from tests.backends.conformance import Target, load_setup

    env = Servers()
    rows = []
    token = d.user("bench-operator", "bench-operator-password")
    try:
        for name in BACKENDS:
            setup = load_setup(name)
            t = Target(name, setup, env.url(setup.SERVER_FIXTURE))
            f = await stepdown.run(d, t, workdir / name, token, runs=sizes.stepdown_runs)
            rows.append(
                Row(
                    f"step-down -> new leader in the API, {name}",
                    f"median {f.median:.3f} s ({min(f.times, default=0):.3f}-"
                    f"{max(f.times, default=0):.3f}) over {len(f.times)}"
                    + (f"; {len(f.failures)} failed: {f.failures[0][:80]}" if f.failures else ""),
                    "keep 0.06-0.12 s (s3 polls: 0.23-1.3 s)",
                    not f.failures,
                )
            )
    finally:
        env.stop()
    return rows


async def part_agent(sizes: Sizes) -> list[Row]:
    """One agent process with 100 elections: RSS and CPU (it starts its own dashboard)."""
    from bench import agent_footprint

    measured, failures = await asyncio.to_thread(
        agent_footprint.run_scenarios,
        list(sizes.agent_scenarios),
        sizes.agent_elections,
        sizes.agent_cpu_seconds,
    )
    rows = [
        Row(
            f"agent, {m['elections']} elections, {m['name']}",
            f"RSS {m['rss']:.1f} MB ({m['imports']:.1f} MB imports), CPU {m['cpu']:.1f} %",
            f"< {agent_footprint.target_mb(m):.0f} MB",
            m["rss"] < agent_footprint.target_mb(m),
        )
        for m in measured
    ]
    if failures:
        rows.append(Row("agent footprint", f"{failures} scenario(s) failed", "", False))
    return rows


def table(rows: list[Row]) -> str:
    width = max(len(r.figure) for r in rows)
    lines = [f"{'figure':<{width}}  {'measured':<70}  target"]
    for r in rows:
        mark = "" if r.ok is None else ("  ok" if r.ok else "  MISSED")
        lines.append(f"{r.figure:<{width}}  {r.measured:<70}  {r.target}{mark}")
    return "\n".join(lines)


async def collect(parts: list[str], sizes: Sizes, processes: int) -> list[Row]:
    """Run the parts, each against a dashboard of its own; one row per figure."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="electorate-bench-") as tmp:
        work = Path(tmp)
        jobs: dict[str, Callable[[server.Dashboard], Awaitable[list[Row]]]] = {
            "ingest": lambda d: part_ingest(d, sizes),
            "heartbeats": lambda d: part_heartbeats(d, sizes),
            "latency": lambda d: part_latency(d, sizes),
            "map": lambda d: part_map(d, sizes),
            "stepdown": lambda d: part_stepdown(d, sizes, work / "stepdown"),
        }
        for part in parts:
            print(f"-- {part}", file=sys.stderr, flush=True)
            try:
                if part == "agent":
                    rows += await part_agent(sizes)
                    continue
                rows += await with_dashboard(work / part, processes, jobs[part])
            except Exception as exc:  # one broken part must not hide the others' figures
                rows.append(Row(part, f"failed: {exc}"[:200], "", False))
    return rows


async def main_async(parts: list[str], sizes: Sizes, processes: int, out: Path | None) -> int:
    rows = await collect(parts, sizes, processes)
    print()
    print(
        f"Electorate benchmarks, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {processes} server "
        f"process(es), {platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores"
    )
    print(table(rows))
    if out is not None:
        await asyncio.to_thread(out.write_text, json.dumps([asdict(r) for r in rows], indent=2))
    return 0 if all(r.ok is not False for r in rows) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"from: {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the benches")
    parser.add_argument("--processes", type=int, default=2, help="server processes")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s): {', '.join(unknown)}")
    return asyncio.run(main_async(parts, QUICK if args.quick else FULL, args.processes, args.json))


if __name__ == "__main__":
    sys.exit(main())
