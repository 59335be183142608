"""Database work of one server process is not serialised: an agent whose transaction waits
(here on a row lock held from outside) does not hold back other agents' acks."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import psycopg
import pytest

from tests.helpers import event
from tests.live import LiveDashboard, frame, open_agent

pytestmark = pytest.mark.live

HOLD = 4.0


async def test_a_slow_agent_does_not_hold_other_agents_acks(
    production_dashboard: LiveDashboard,
) -> None:
    dashboard = production_dashboard
    suffix = uuid.uuid4().hex[:6]
    slow_id, fast_id = f"slow-{suffix}", f"fast-{suffix}"
    tokens = dashboard.tokens([slow_id, fast_id])
    slow = await open_agent(dashboard, slow_id, [f"slow/{suffix}"], token=tokens[slow_id])
    fast = await open_agent(dashboard, fast_id, [f"fast/{suffix}"], token=tokens[fast_id])
    assert (await frame(slow))["type"] == (await frame(fast))["type"] == "ack"

    with psycopg.connect(dashboard.env["DATABASE_URL"]) as blocker:
        # Hold the slow agent's row: its ingest must wait for this transaction.
        blocker.execute("SELECT 1 FROM elections_agent WHERE id = %s FOR UPDATE", [slow_id])
        await slow.send(json.dumps({"type": "events", "items": [event(1, f"slow/{suffix}")]}))
        await asyncio.sleep(0.3)  # let it reach the database and wait there
        started = time.monotonic()
        await fast.send(json.dumps({"type": "events", "items": [event(1, f"fast/{suffix}")]}))
        assert await frame(fast, timeout=HOLD) == {"type": "ack", "seq": 1}
        took = time.monotonic() - started
        assert took < HOLD / 2, f"the fast agent waited {took:.2f}s behind the slow one"
        await asyncio.sleep(HOLD - took)
        blocker.rollback()
    # The slow agent is served once the lock is gone, and nothing was lost.
    assert await frame(slow, timeout=10) == {"type": "ack", "seq": 1}
    await slow.close()
    await fast.close()
