"""Runner scenarios that the per-backend tests play alike and then judge each in its own terms
(how fast a follower took over, what the fencing tokens were)."""

from __future__ import annotations

import asyncio
import time

from agent.runner import ElectionRunner, StepDownResult
from tests.helpers import eventually


async def stop_all(*runners: ElectionRunner, resign: bool = True) -> None:
    await asyncio.gather(*(r.stop(resign=resign) for r in runners))


def the_leader(runners: list[ElectionRunner]) -> ElectionRunner | None:
    """The one runner that leads, or None; fails the test when two do."""
    leading = [r for r in runners if r.is_leader()]
    assert len(leading) <= 1, [r.agent_id for r in leading]
    return leading[0] if leading else None


async def a_leads_b(a: ElectionRunner, b: ElectionRunner) -> None:
    """Start ``a`` alone until it leads, then ``b`` until it follows ``a``."""
    await a.start()
    await eventually(a.is_leader, timeout=5)
    await b.start()
    await eventually(lambda: b.leader == a.agent_id, timeout=5)


async def handover(
    a: ElectionRunner, b: ElectionRunner, hold_off: float
) -> tuple[float, StepDownResult]:
    """``a`` leads and ``b`` waits on the backend's notification; ``a`` steps down. How long
    ``b`` took to lead after the step-down began, and the step-down's result. Both stop."""
    try:
        await a_leads_b(a, b)
        await asyncio.sleep(0.2)  # b is waiting on its notification now
        started = time.monotonic()
        step_down = asyncio.create_task(a.step_down(hold_off=hold_off))
        await eventually(b.is_leader, timeout=5, interval=0.005)
        elapsed = time.monotonic() - started
        return elapsed, await step_down
    finally:
        await stop_all(a, b)


async def successive_terms(
    runners: list[ElectionRunner], terms: int, hold_off: float
) -> list[tuple[int, StepDownResult]]:
    """Start the runners, then step down whoever leads, ``terms`` times: each leader's fencing
    token with the result of its step-down."""
    for r in runners:
        await r.start()
    seen: list[tuple[int, StepDownResult]] = []
    for _ in range(terms):
        leader = await eventually(lambda: the_leader(runners))
        assert isinstance(leader, ElectionRunner) and leader.token is not None
        seen.append((leader.token, await leader.step_down(hold_off=hold_off)))
    return seen
