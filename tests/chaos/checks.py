"""What every chaos test proves at the end, whatever it broke on the way.

Safety, from outside (``HealthSampler`` with tokens: every agent's health endpoint every
20 ms): never two agents answering 200 in one round, and a fencing token that only grows from
one leader to the next. Reporting, on the dashboard: every transition each agent made is
stored exactly once (seqs 1..last with no gap and no repeat, no transition stored twice under
two seqs), every term the sampler saw is among them, and the terms the dashboard derived
from them name the same leaders with the same tokens, ending with the leader of now.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

from tests.backends.conformance import AgentProcess, Cluster, HealthSampler, Target
from tests.live import LiveDashboard, link_agents, stored_history

#: Waits for agents to start and settle: bounds, not measurements.
START = 15.0


def cluster_ids(name: str) -> list[str]:
    """Agent ids of their own, so that clusters sharing a dashboard stay apart."""
    tag = uuid.uuid4().hex[:6]
    return [f"chaos-{name}-{tag}-{i}" for i in range(3)]


@contextlib.asynccontextmanager
async def reporting_cluster(
    t: Target,
    dashboard: LiveDashboard,
    name: str,
    tokens: Path,
    workdir: Path,
    start: float,
    *,
    clean_up: bool = False,
) -> AsyncIterator[Cluster]:
    """Three agents on ``t`` (in ``workdir``, their tokens in ``tokens``) that report to
    ``dashboard``, started, one of them leading within ``start`` seconds; closed at the end
    (and with ``clean_up``, their election's state removed from ``t``)."""
    ids = cluster_ids(name)
    configure = await asyncio.to_thread(link_agents, dashboard, tokens, ids)
    cluster = Cluster(t, workdir, configure=configure, ids=ids)
    cluster.start()
    try:
        await cluster.leader(start)
        yield cluster
    finally:
        await cluster.close()
        if clean_up:
            await t.cleanup(cluster.election)


@contextlib.asynccontextmanager
async def sampled(cluster: Cluster) -> AsyncIterator[HealthSampler]:
    """The cluster's health endpoints sampled, with tokens, from its current leader on."""
    async with HealthSampler(cluster.agents, tokens=True) as sampler:
        await watching(sampler)
        yield sampler


async def assert_safe_and_reported(
    sampler: HealthSampler, cluster: Cluster, dashboard: LiveDashboard, *, min_terms: int
) -> None:
    """``assert_safe``, then ``assert_every_transition_once``."""
    assert_safe(sampler, cluster.logs(), min_terms=min_terms)
    await assert_every_transition_once(dashboard, cluster.agents, sampler)


def assert_safe(sampler: HealthSampler, logs: str, *, min_terms: int) -> None:
    spans = [(round(last - first, 3), agents) for first, last, agents in sampler.overlaps()]
    assert spans == [], f"two agents answered 200 at once (span seconds, agents): {spans}\n{logs}"
    problems = sampler.token_problems()
    assert problems == [], f"fencing tokens went backwards: {problems}\n{sampler.terms}\n{logs}"
    # A checker that saw nothing proves nothing.
    assert sampler.rounds > 50, f"the health endpoints were sampled {sampler.rounds} times"
    assert len(sampler.terms) >= min_terms, (
        f"the sampler saw {len(sampler.terms)} terms, expected {min_terms}: {sampler.terms}"
    )


async def watching(sampler: HealthSampler, timeout: float = 5) -> None:
    """Wait until the sampler has seen the current leader and its token: a fault injected
    before that would leave a term uncounted."""
    deadline = time.monotonic() + timeout
    while not sampler.terms:
        assert time.monotonic() < deadline, f"the sampler saw no leader within {timeout}s"
        await asyncio.sleep(0.02)


async def drained(agents: list[AgentProcess], timeout: float) -> dict[str, int]:
    """Wait until every agent is linked to the dashboard with nothing left in its spool and
    its last seq stable; return that seq per agent."""
    deadline = time.monotonic() + timeout
    previous: dict[str, int] | None = None
    statuses: list[dict | None] = []
    while time.monotonic() < deadline:
        statuses = list(await asyncio.gather(*(a.status() for a in agents)))
        if all(s and s["dashboard"]["connected"] and not s["spool"]["pending"] for s in statuses):
            seqs = {a.id: s["spool"]["last_seq"] for a, s in zip(agents, statuses, strict=True)}
            if seqs == previous:
                return seqs
            previous = seqs
        else:
            previous = None
        await asyncio.sleep(0.2)
    raise AssertionError(f"the agents' spools did not drain within {timeout}s: {statuses}")


async def assert_every_transition_once(
    dashboard: LiveDashboard, agents: list[AgentProcess], sampler: HealthSampler
) -> dict[str, list[dict]]:
    last = await drained(agents, 30)
    stored, terms = await asyncio.to_thread(
        stored_history, dashboard, [a.id for a in agents], agents[0].election
    )
    for agent in agents:
        rows = stored[agent.id]
        seqs = [r["seq"] for r in rows]
        assert seqs == list(range(1, last[agent.id] + 1)), (
            f"{agent.id} made transitions 1..{last[agent.id]}, the dashboard stored {seqs}"
        )
        same = Counter(
            (r["election__name"], r["from_state"], r["to_state"], r["token"], r["agent_time"])
            for r in rows
        )
        assert [k for k, n in same.items() if n > 1] == [], f"{agent.id}: stored twice"
    leader_rows = {
        (r["agent_id"], r["token"])
        for rows in stored.values()
        for r in rows
        if r["to_state"] == "leader"
    }
    missing = [(a, t) for _, a, t in sampler.terms if (a, t) not in leader_rows]
    assert missing == [], f"terms seen at the health endpoints but not on the dashboard: {missing}"
    derived = {(t["leader_id"], t["token"]) for t in terms}
    missing = [(a, t) for _, a, t in sampler.terms if (a, t) not in derived]
    assert missing == [], f"leaders the dashboard has no term for: {missing}\nterms: {terms}"
    open_terms = [(t["leader_id"], t["token"]) for t in terms if t["ended"] is None]
    assert open_terms == [sampler.terms[-1][1:]], (
        f"the dashboard's open terms {open_terms}, the leader now {sampler.terms[-1][1:]}"
    )
    return stored
