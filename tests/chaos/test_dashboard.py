"""Chaos on the reporting side: the dashboard, then its PostgreSQL and its Redis, go down hard
while leadership changes. Elections must not care (the health checker watches them), and
once everything is back the dashboard must hold every transition of every agent exactly once:
the agents' spools keep what was not acked, and the dashboard must not store a replay twice.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backends.conformance import Cluster, target
from tests.chaos.checks import (
    START,
    assert_safe_and_reported,
    drained,
    reporting_cluster,
    sampled,
)
from tests.live import LiveDashboard, start_dashboard
from tests.servers import PrivatePostgres, PrivateRedis, private

pytestmark = [pytest.mark.chaos, pytest.mark.live]


async def change_leader(cluster: Cluster, sig: int) -> None:
    """Replace the leader (``sig`` to it), then bring it back with its spool."""
    leader = await cluster.leader(START)
    await cluster.failover(leader, sig, cluster.target.ttl + 10)
    await leader.wait(10)
    leader.start()
    await cluster.leader(START)


async def pending(cluster: Cluster) -> int:
    """Events the agents hold that the dashboard has not acked."""
    statuses = await asyncio.gather(*(a.status() for a in cluster.agents))
    return sum(s["spool"]["pending"] for s in statuses if s)


def kill(dashboard: LiveDashboard) -> None:
    assert dashboard.proc is not None
    dashboard.proc.kill()
    dashboard.proc.wait()


def restart(dashboard: LiveDashboard) -> None:
    dashboard.proc = dashboard.serve(int(dashboard.url.rsplit(":", 1)[1]))


@pytest.fixture
def own_dashboard(tmp_path: Path) -> Iterator[LiveDashboard]:
    # A dashboard of this test's own: it is killed.
    dashboard = start_dashboard(tmp_path / "dashboard", production=False)
    try:
        yield dashboard
    finally:
        dashboard.stop()


async def test_dashboard_killed_and_restarted_with_leader_changes_between(
    own_dashboard: LiveDashboard, redis_url: str, tmp_path: Path
) -> None:
    dashboard = own_dashboard
    t = target("redis", redis_url)
    async with reporting_cluster(
        t, dashboard, "dash", tmp_path, tmp_path / "agents", START
    ) as cluster:
        async with sampled(cluster) as sampler:
            # Killed while idle, then two leader changes (a crash, a resign) while it is away.
            await drained(cluster.agents, 30)
            kill(dashboard)
            await change_leader(cluster, signal.SIGKILL)
            await change_leader(cluster, signal.SIGTERM)
            held = await pending(cluster)
            assert held > 0, "the leader changes left nothing for the dashboard to catch up on"
            restart(dashboard)
            await drained(cluster.agents, 30)
            # Killed while a leader change is being reported (its frames arrive within a few
            # ms): a frame stored but not yet acked must not be stored again when resent.
            leader = await cluster.leader(START)
            leader.send(signal.SIGTERM)
            await asyncio.sleep(0.02)
            kill(dashboard)
            await leader.wait(10)
            leader.start()
            await change_leader(cluster, signal.SIGKILL)
            restart(dashboard)
            await cluster.leader(START)
        await assert_safe_and_reported(sampler, cluster, dashboard, min_terms=5)


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    with private(PrivatePostgres) as server:
        yield server


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    with private(PrivateRedis) as server:
        yield server


@pytest.fixture
def production_on_private_servers(
    private_pg: PrivatePostgres, private_redis: PrivateRedis, tmp_path: Path
) -> Iterator[LiveDashboard]:
    dashboard = start_dashboard(
        tmp_path / "dashboard",
        production=True,
        database_server=private_pg.dsn,
        extra_env={"REDIS_URL": private_redis.url},
    )
    try:
        yield dashboard
    finally:
        dashboard.stop()  # the database goes with the private server


async def test_production_dashboard_survives_its_postgres_and_redis_restarting(
    production_on_private_servers: LiveDashboard,
    private_pg: PrivatePostgres,
    private_redis: PrivateRedis,
    pg_dsn: str,
    tmp_path: Path,
) -> None:
    dashboard = production_on_private_servers
    # The election itself runs on the shared PostgreSQL: only the dashboard's servers go down.
    t = target("postgres", pg_dsn)
    async with reporting_cluster(
        t, dashboard, "prod", tmp_path, tmp_path / "agents", START, clean_up=True
    ) as cluster:
        async with sampled(cluster) as sampler:
            outages = [
                ("PostgreSQL", private_pg.crash, private_pg.start),
                ("Redis", private_redis.kill, private_redis.start),
            ]
            for server, down, up in outages:
                await drained(cluster.agents, 30)
                down()
                await change_leader(cluster, signal.SIGTERM)
                await change_leader(cluster, signal.SIGKILL)
                if server == "PostgreSQL":
                    # Nothing can be stored, so nothing acked: the spools hold it all.
                    assert await pending(cluster) > 0, "transitions acked without a database"
                up()
                started = time.monotonic()
                await drained(cluster.agents, 60)
                caught_up = time.monotonic() - started
                assert caught_up < 30, f"the dashboard caught up {caught_up:.1f}s after {server}"
            await cluster.leader(START)
        await assert_safe_and_reported(sampler, cluster, dashboard, min_terms=5)
