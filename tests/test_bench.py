"""The benchmarks still run (tiny sizes): their timing targets live in the bench, not here."""

from __future__ import annotations

import pytest

from bench import run

pytestmark = pytest.mark.live


async def test_every_bench_part_runs_and_reports_its_figures() -> None:
    sizes = run.Sizes((3,), 30.0, 1.0, 10, 2.0, (2,), 3, 60, 1, repeat=1)
    rows = await run.collect(["ingest", "heartbeats", "latency", "map"], sizes, processes=1)
    assert [r.figure.split(",")[0].split(" at ")[0] for r in rows] == [
        "ingest",
        "heartbeats",
        "event -> live frame",
        "GET /",
        "GET /api/v1/elections",
        "live snapshot",
    ]
    assert not [r for r in rows if r.measured.startswith("failed")], rows
    ingest = rows[0]
    assert "exactly once" in ingest.measured
