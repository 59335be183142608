"""Raft step-down: time until another member leads, step-downs back to back.

    .venv/bin/python bench/raft_stepdown.py [--runs 16] [--hold-off 2] [--ttl 3]

Three in-process runners elect over real TCP (the agent's own runner and backend, as
``electorate-agent`` runs them). The leader steps down as the dashboard asks it to (holding off
for ``--hold-off`` afterwards), and the next step-down starts as soon as a new leader shows,
so a member that stepped down seconds earlier may still be holding off. Measured: from the
step-down request until another runner's ``is_leader()`` is true. The flap damper is off here
(it holds off a member that wins three times within five minutes, on purpose).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from agent.config import build_config
from agent.runner import ElectionRunner
from tests.helpers import free_port

TARGET = 0.5
TIMEOUT = 15.0


def make_runners(ttl: float, hold_off: float) -> list[ElectionRunner]:
    ports = [free_port() for _ in range(3)]
    runners = []
    for i, port in enumerate(ports):
        raw = {
            "agent": {"id": f"bench-{i}"},
            "election": [
                {
                    "name": "bench/raft-stepdown",
                    "backend": "raft",
                    "ttl": ttl,
                    "listen": f"127.0.0.1:{port}",
                    "peers": [f"127.0.0.1:{p}" for p in ports],
                    "secret": "raft-step-down-benchmark-secret",
                }
            ],
        }
        config = build_config(raw, Path("<bench>")).elections[0]
        runners.append(ElectionRunner(config, f"bench-{i}", hold_off=hold_off, flap_limit=0))
    return runners


async def leader_of(runners: list[ElectionRunner], timeout: float) -> ElectionRunner:
    deadline = time.monotonic() + timeout
    while True:
        leading = [r for r in runners if r.is_leader()]
        if len(leading) == 1:
            return leading[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no single leader within {timeout:.0f}s")
        await asyncio.sleep(0.002)


async def bench(runs: int, ttl: float, hold_off: float) -> int:
    runners = make_runners(ttl, hold_off)
    for runner in runners:
        await runner.start()
    times: list[float] = []
    try:
        leader = await leader_of(runners, TIMEOUT)
        for run in range(runs):
            started = time.monotonic()
            step_down = asyncio.create_task(leader.step_down())
            others = [r for r in runners if r is not leader]
            leader = await leader_of(others, TIMEOUT)
            took = time.monotonic() - started
            times.append(took)
            await step_down
            print(f"step-down {run + 1}/{runs}: {leader.agent_id} leads after {took:.3f}s")
    finally:
        await asyncio.gather(*(r.stop() for r in runners))
    median = statistics.median(times)
    print()
    print(f"raft step-down, 3 members, ttl {ttl:g}s, hold-off {hold_off:g}s, back to back")
    print(f"{'runs':>5} {'median':>8} {'min':>8} {'max':>8}   target")
    verdict = "ok" if median < TARGET else "MISSED"
    print(
        f"{len(times):5d} {median:8.3f} {min(times):8.3f} {max(times):8.3f}   "
        f"median < {TARGET} s: {verdict}"
    )
    return 0 if median < TARGET else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=16, help="step-downs (default 16)")
    parser.add_argument("--ttl", type=float, default=3.0, help="election ttl in seconds")
    parser.add_argument("--hold-off", type=float, default=2.0, help="seconds out of the race")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return asyncio.run(bench(args.runs, args.ttl, args.hold_off))


if __name__ == "__main__":
    sys.exit(main())
