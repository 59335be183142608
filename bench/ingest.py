"""Ingest: N agents stream transitions over real websockets; acked transitions per second,
ack latency, and an exactly-once check in the database."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import psycopg

from bench.fleet import SimAgent, connected_fleet, median, percentile
from bench.server import Dashboard

#: The cycle each election goes through: follower -> candidate -> leader -> follower.
CYCLE = [("candidate", False), ("leader", True), ("follower", False)]
#: Seconds to wait for the backlog to be acked after the offered load ends: an overloaded
#: server must still store every transition once (it is slow, not lossy).
DRAIN = 180.0


@dataclass
class IngestFigures:
    agents: int
    sent: int
    per_second: float
    ack_p50: float
    ack_p99: float
    stored: int
    duplicates: int
    unacked: int
    errors: int

    @property
    def exactly_once(self) -> bool:
        return self.stored == self.sent and self.duplicates == 0 and self.unacked == 0


async def run(
    dashboard: Dashboard, *, agents: int, rate: float, seconds: float, batch: int = 1
) -> IngestFigures:
    """``agents`` agents together offer ``rate`` transitions a second for ``seconds``, in
    frames of ``batch`` transitions, sent without waiting for acks: ``batch=1`` is an agent
    whose transitions come one by one; more is a burst (a campaign, a win, several
    elections changing together), which the agent's link sends as one frame."""
    prefix = f"ing{random.randrange(10**6)}"
    fleet = await connected_fleet(dashboard, prefix, agents, lambda a: [f"{a}/e0", f"{a}/e1"])
    interval = agents * batch / rate
    started = time.monotonic()
    deadline = started + seconds

    async def stream(agent: SimAgent) -> None:
        step, term = 0, 0
        await asyncio.sleep(random.uniform(0, interval))
        next_at = time.monotonic()
        while next_at < deadline:
            events = []
            for _ in range(batch):
                election = agent.elections[step % 2]
                to, wins = CYCLE[(step // 2) % 3]
                if wins:
                    term += 1
                events.append(agent.event(election, to, term, agent.id if wins else None))
                step += 1
            await agent.send_events(events)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    await asyncio.gather(*(stream(a) for a in fleet))
    await asyncio.gather(*(a.drained(DRAIN) for a in fleet))
    # Throughput over the time it took to ack what was offered: the offered 20 s when the
    # server keeps up, longer when a backlog had to be drained.
    last_ack = max((a.last_ack_at for a in fleet), default=started)
    elapsed = max(seconds, last_ack - started)
    sent = sum(a.seq for a in fleet)
    latencies = [x for a in fleet for x in a.ack_latencies]
    with psycopg.connect(dashboard.env["DATABASE_URL"]) as conn:
        stored, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT (agent_id, seq)) FROM elections_transition "
            "WHERE agent_id LIKE %s",
            [f"{prefix}-%"],
        ).fetchone()
    for agent in fleet:
        await agent.close()
    return IngestFigures(
        agents=agents,
        sent=sent,
        per_second=sum(a.acked for a in fleet) / elapsed,
        ack_p50=median(latencies),
        ack_p99=percentile(latencies, 0.99),
        stored=stored,
        duplicates=stored - distinct,
        unacked=sum(a.seq - a.acked for a in fleet),
        errors=sum(len(a.errors) for a in fleet),
    )
