"""A Redis outage under a production-mode dashboard (its own Redis, stopped and started):
agents are still accepted, their events ingested and acked; a command fails at once with
the reason; once Redis is back the agents' groups are joined again, commands reach them,
and browsers get a fresh snapshot."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.helpers import event
from tests.live import (
    LiveDashboard,
    LiveViewer,
    api,
    create_user,
    frame,
    log_in,
    open_agent,
    open_live,
    production,
)
from tests.servers import PrivateRedis, private

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def redis() -> Iterator[PrivateRedis]:
    with private(PrivateRedis) as server:
        yield server


@pytest.fixture(scope="module")
def dashboard(
    redis: PrivateRedis, tmp_path_factory: pytest.TempPathFactory, pg_dsn: str
) -> Iterator[LiveDashboard]:
    with production(
        tmp_path_factory.mktemp("redis-outage"),
        extra_env={"REDIS_URL": redis.url, "ELECTORATE_TICKER": "1"},
    ) as dashboard:
        yield dashboard


async def until_command(ws: Any, timeout: float) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        message = await frame(ws, timeout=max(0.1, deadline - asyncio.get_running_loop().time()))
        if message["type"] == "command":
            return message


async def test_agents_are_served_through_a_redis_outage(
    dashboard: LiveDashboard, redis: PrivateRedis
) -> None:
    # The Celery worker of a production dashboard needs Redis too: the in-process ticker
    # does the sweeps here, so this test is only about the channel layer.
    suffix = uuid.uuid4().hex[:6]
    name = f"outage/{suffix}"
    leader_id, follower_id, late_id = (f"{x}-{suffix}" for x in ("lead", "follow", "late"))
    tokens = dashboard.tokens([leader_id, follower_id, late_id])
    create_user(dashboard, "outage-op", "outage-password-1")
    api_token = dashboard.manage("create_api_token", "outage-op").strip()
    viewer = LiveViewer(
        await open_live(dashboard, log_in(dashboard, "outage-op", "outage-password-1"))
    )
    await viewer.next()
    leader = await open_agent(dashboard, leader_id, [name], token=tokens[leader_id])
    follower = await open_agent(dashboard, follower_id, [name], token=tokens[follower_id])
    assert (await frame(leader))["type"] == (await frame(follower))["type"] == "ack"
    await leader.send(json.dumps({"type": "events", "items": [event(1, name, leader=leader_id)]}))
    assert await frame(leader) == {"type": "ack", "seq": 1}
    item = event(1, name, to="follower", token=1, leader=leader_id)
    await follower.send(json.dumps({"type": "events", "items": [item]}))
    assert await frame(follower) == {"type": "ack", "seq": 1}

    redis.kill()
    await asyncio.sleep(2)  # the dashboard notices
    # Sockets stay open; events are stored and acked; a new agent is accepted.
    item = event(2, name, to="follower", token=1, leader=leader_id)
    await follower.send(json.dumps({"type": "events", "items": [item]}))
    assert await frame(follower) == {"type": "ack", "seq": 2}
    late = await open_agent(dashboard, late_id, [name], token=tokens[late_id])
    assert (await frame(late))["type"] == "ack"
    # A step-down cannot be delivered: it fails at once, saying why.
    answer = api(
        dashboard, api_token, "POST", f"/api/v1/elections/{name}/step-down", {"reason": "x"}
    )
    assert answer["command"]["status"] == "failed", answer
    assert "Redis" in answer["command"]["result"]

    redis.start()  # an empty Redis: every group membership is gone
    # Heartbeats, as real agents send every few seconds: the test dashboard counts an agent
    # silent for 5 s as offline, and this test has taken about that long by now.
    now = datetime.now(UTC).isoformat()
    for ws, state in ((leader, "leader"), (follower, "follower")):
        beat = {"state": state, "leader": leader_id, "token": 1}
        await ws.send(json.dumps({"type": "heartbeat", "at": now, "states": {name: beat}}))
    await asyncio.sleep(3)
    answer = api(
        dashboard,
        api_token,
        "POST",
        f"/api/v1/elections/{name}/step-down",
        {"reason": "y", "wait": 0},
    )
    assert answer["command"]["status"] == "sent", answer["command"]["result"]
    command = await until_command(leader, timeout=10)
    assert command["election"] == name and command["kind"] == "step-down"
    # The browser that lived through the outage still gets live frames.
    await follower.send(
        json.dumps({"type": "events", "items": [event(3, name, token=7, leader=follower_id)]})
    )
    assert await frame(follower) == {"type": "ack", "seq": 3}
    await viewer.until(f'data-testid="leader">{follower_id}<', timeout=10)
    for ws in (leader, follower, late, viewer.ws):
        await ws.close()
    assert "Traceback" not in dashboard.log()
