"""Chaos against the election backends: real agent processes, real servers, faults the hard
way, and a checker at every agent's health endpoint the whole time (see ``checks``).

- every backend: the leader is killed -9 (and comes back with its spool), twice; where the
  seat can be taken from outside (``remove_seat``: PostgreSQL's ``pg_terminate_backend`` of
  the leader's session, etcd's lease revoke), that too; agents report to a dashboard, which
  must end with every transition once;
- nats: the server itself is killed -9 and restarted (a private one, with its store);
- raft: the leader is partitioned from its peers (network namespaces).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backends import setup_nats
from tests.backends.conformance import (
    NAMES,
    AgentProcess,
    Cluster,
    HealthSampler,
    Target,
    target,
    target_for,
)
from tests.chaos.checks import (
    START,
    assert_safe,
    assert_safe_and_reported,
    reporting_cluster,
    sampled,
    watching,
)
from tests.chaos.netns import Network
from tests.helpers import free_port
from tests.live import LiveDashboard
from tests.servers import PrivateNats, private

pytestmark = [pytest.mark.chaos, pytest.mark.live]

#: A killed leader is replaced within TTL plus this (as in the conformance suite).
KILL_MARGIN = 1.0


@pytest.fixture(params=NAMES)
def backend(request: pytest.FixtureRequest) -> Target:
    return target_for(request)


async def new_term(
    cluster: Cluster,
    sampler: HealthSampler,
    above: int,
    timeout: float,
    since: float | None = None,
) -> float:
    """Seconds from ``since`` (default: now) until one agent leads with a token above
    ``above``; a term that began after ``since`` counts even if it began before this call."""
    started = time.monotonic() if since is None else since
    while not any(t is not None and t > above for at, _, t in sampler.terms if at >= started):
        assert time.monotonic() - started < timeout, f"nobody leads again\n{cluster.logs()}"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def token_of(agent: AgentProcess) -> int:
    state = await agent.state()
    assert state is not None and isinstance(state["token"], int), state
    return state["token"]


async def test_killed_and_removed_leaders_never_overlap(
    backend: Target, embedded_dashboard: LiveDashboard, tmp_path: Path
) -> None:
    t = backend
    async with reporting_cluster(
        t, embedded_dashboard, t.name, tmp_path, tmp_path, t.ttl + START
    ) as cluster:
        terms = 1
        async with sampled(cluster) as sampler:
            for _ in range(2):
                leader = await cluster.leader(t.ttl + START)
                elapsed, new = await cluster.failover(leader, signal.SIGKILL, t.ttl + 10)
                assert elapsed < t.ttl + KILL_MARGIN, f"{new} took over after {elapsed:.2f}s"
                await leader.wait(5)
                leader.start()  # back, with what its spool still holds
                terms += 1
            remove_seat = getattr(t.setup, "remove_seat", None)
            if remove_seat is not None:
                leader = await cluster.leader(t.ttl + START)
                before = await token_of(leader)
                removed = time.monotonic()
                await remove_seat(t.server, cluster.election)
                await new_term(cluster, sampler, before, 2 * t.ttl + 5, since=removed)
                terms += 1
            await cluster.leader(t.ttl + START)
            await asyncio.sleep(0.3)
        await assert_safe_and_reported(sampler, cluster, embedded_dashboard, min_terms=terms)


@pytest.fixture
def private_nats() -> Iterator[PrivateNats]:
    with private(PrivateNats) as server:
        yield server
    setup_nats.forget_server(server.url)


async def test_nats_server_killed_and_restarted(private_nats: PrivateNats, tmp_path: Path) -> None:
    t = target("nats", private_nats.url)
    cluster = Cluster(t, tmp_path)
    cluster.start()
    try:
        old = await cluster.leader(t.ttl + START)
        before = await token_of(old)
        async with HealthSampler(cluster.agents, tokens=True) as sampler:
            await watching(sampler)
            killed = time.monotonic()
            private_nats.kill()
            # No one can prove a lease without the server: by the TTL every 200 has stopped.
            await asyncio.sleep(t.ttl + 1)
            late = sampler.leaders_since(killed + t.ttl)
            assert late == [], f"agents still answered 200 {t.ttl}s into the outage: {late[:3]}"
            # Agents may reconnect and win before start() returns (it polls the port).
            restarted = time.monotonic()
            private_nats.start()
            took = await new_term(cluster, sampler, before, 3 * t.ttl + 15, since=restarted)
            # And a blip shorter than the TTL: writes whose answers were lost, reconnects
            # racing renewals, and still never two leaders.
            await cluster.leader(t.ttl + START)
            private_nats.kill()
            await asyncio.sleep(0.3)
            private_nats.start()
            await cluster.leader(3 * t.ttl + START)
            await asyncio.sleep(0.3)
        assert_safe(sampler, cluster.logs(), min_terms=2)
        assert took < 3 * t.ttl + 10, f"a leader again {took:.1f}s after the restart"
    finally:
        await cluster.close()


@pytest.fixture
def network() -> Iterator[Network]:
    net = Network(3)
    try:
        net.create()
        yield net
    finally:
        net.remove()
    assert net.leftovers() == [], "namespaces or links left behind"


async def test_partitioned_raft_leader_stands_down_before_the_majority_elects(
    network: Network, tmp_path: Path
) -> None:
    t = target("raft", None)
    port = free_port()  # each member has an address of its own: one port serves all
    peers = [f"{host}:{port}" for host in network.hosts]

    def configure(i: int, raw: dict) -> None:
        raw["election"][0].update(listen=peers[i], peers=peers)

    cluster = Cluster(
        t,
        tmp_path,
        configure=configure,
        hosts=network.hosts,
        prefixes=[network.prefix(i) for i in range(3)],
    )
    cluster.start()
    try:
        old = await cluster.leader(START)
        index = cluster.agents.index(old)
        async with HealthSampler(cluster.agents, tokens=True) as sampler:
            await watching(sampler)
            cut = time.monotonic()
            network.isolate(index)
            await new_term(cluster, sampler, last_token(sampler, old.id), 10, since=cut)
            elected = min(
                at
                for at, leading in sampler.history
                if at >= cut and any(a != old.id for a in leading)
            )
            last_old = max(at for at, leading in sampler.history if old.id in leading)
            # The minority side must not lead again while cut off.
            await asyncio.sleep(1.5)
            again = [ls for ls in sampler.leaders_since(last_old + 0.001) if old.id in ls]
            assert again == [], f"{old.id} led again while partitioned\n{cluster.logs()}"
            majority_term = sampler.terms[-1]
            healed = time.monotonic()
            network.heal()
            await cluster.leader(START)  # converged: one leader, every member names it
            await asyncio.sleep(1.0)
        # Pre-vote: the member coming back with a stale term must not depose a healthy leader.
        after = [(a, token) for at, a, token in sampler.terms if at >= healed]
        assert after == [], (
            f"the healed partition changed the leader: {majority_term[1:]} -> {after}\n"
            f"{cluster.logs()}"
        )
        assert last_old < elected, (
            f"{old.id} still answered 200 {last_old - elected:.3f}s after the majority elected"
        )
        assert last_old - cut < t.ttl, f"{old.id} led {last_old - cut:.2f}s into the partition"
        assert_safe(sampler, cluster.logs(), min_terms=2)
    finally:
        await cluster.close()


def last_token(sampler: HealthSampler, agent: str) -> int:
    tokens = [t for _, a, t in sampler.terms if a == agent and isinstance(t, int)]
    assert tokens, f"the sampler never saw {agent} lead: {sampler.terms}"
    return tokens[-1]
