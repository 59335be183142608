"""The benchmarks still run (tiny sizes): their timing targets live in the bench, not here."""

from __future__ import annotations

import pytest

from bench import run

pytestmark = pytest.mark.live


async def test_every_bench_part_runs_and_reports_its_figures() -> None:
    sizes = run.Sizes(
        (3,), 30.0, 1.0, 10, 2.0, (2,), 3, 60, 1, ingest_batch=3, ingest_sustained_rate=15.0
    )
    rows = await run.collect(["ingest", "heartbeats", "latency", "map"], sizes, processes=1)
    assert [r.figure.split(",")[0].split(" at ")[0] for r in rows] == [
        "ingest",
        "ingest",
        "ingest",
        "heartbeats",
        "event -> live frame",
        "GET /",
        "GET /api/v1/elections",
        "live snapshot",
    ]
    assert not [r for r in rows if r.measured.startswith("failed")], rows
    for ingest in rows[:3]:
        assert ingest.measured.endswith("; exactly once"), ingest


async def test_the_agent_footprint_part_measures_a_real_agent() -> None:
    # One scenario: the others need more servers and time.
    sizes = run.Sizes(
        (3,),
        30.0,
        1.0,
        10,
        2.0,
        (2,),
        3,
        60,
        1,
        agent_elections=3,
        agent_cpu_seconds=1.0,
        agent_scenarios=("raft",),
    )
    rows = await run.collect(["agent"], sizes, processes=1)
    [row] = rows
    assert row.figure == "agent, 3 elections, raft", rows
    assert row.measured.startswith("RSS "), rows
    rss = float(row.measured.split()[1])
    assert 5 < rss < 500, row  # a real process's resident memory, in MB
