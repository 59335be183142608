"""Periodic work in production mode runs in a real Celery worker (with beat) on Redis: the
dashboard processes run no ticker there."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid

import pytest

from tests.live import LiveDashboard, create_user, frame, open_agent

pytestmark = pytest.mark.live


async def test_a_silent_agent_is_marked_offline_by_the_celery_worker(
    production_dashboard: LiveDashboard,
) -> None:
    dashboard = production_dashboard
    assert dashboard.env["ELECTORATE_TICKER"] == "0"
    create_user(dashboard, "celery-watcher", "celery-password-1")
    agent_id = f"silent-{uuid.uuid4().hex[:6]}"
    ws = await open_agent(dashboard, agent_id, [f"silent/{agent_id}"])
    assert (await frame(ws))["type"] == "ack"
    token = dashboard.manage("create_api_token", "celery-watcher").strip()

    def connected() -> bool:
        request = urllib.request.Request(
            dashboard.url + "/api/v1/agents", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            agents = json.loads(response.read())["agents"]
        return next(a["connected"] for a in agents if a["id"] == agent_id)

    assert connected()
    # The socket stays open but the agent says nothing: only the sweep can notice, and in
    # production mode only the Celery worker runs it (stale after 5 s in these tests).
    deadline = time.monotonic() + 20
    while connected():
        assert time.monotonic() < deadline, "the agent was never marked offline"
        await asyncio.sleep(0.5)
    assert "sweep_stale_agents" in (dashboard.workdir / "celery.log").read_text()
    await ws.close()
