"""Production-mode websockets survive idling.

channels-redis waits for messages in a blocking Redis read of 5 s; when the connection's own
read timeout was also 5 s the two raced, and about one idle socket in twenty (agents and
browsers alike) was dropped with 1011 every few seconds. Many sockets idle here for more than
two such waits, so the race would show.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from tests.helpers import event
from tests.live import (
    LiveDashboard,
    LiveViewer,
    create_user,
    frame,
    log_in,
    open_agent,
    open_live,
)

pytestmark = pytest.mark.live

IDLE = 12.0
AGENTS = 30
VIEWERS = 10


async def test_idle_production_sockets_stay_open_and_working(
    production_dashboard: LiveDashboard,
) -> None:
    dashboard = production_dashboard
    create_user(dashboard, "idler", "idle-password-1")
    session = log_in(dashboard, "idler", "idle-password-1")
    name = f"idle/{uuid.uuid4().hex[:8]}"
    ids = [f"idle-{uuid.uuid4().hex[:6]}-{i}" for i in range(AGENTS)]
    tokens = dashboard.tokens(ids)
    agents = [await open_agent(dashboard, a, [name], token=tokens[a]) for a in ids]
    for ws in agents:
        assert await frame(ws) == {"type": "ack", "seq": 0}
    viewers = [LiveViewer(await open_live(dashboard, session)) for _ in range(VIEWERS)]
    for viewer in viewers:
        await viewer.next()  # the snapshot

    await asyncio.sleep(IDLE)

    for ws in agents:  # each agent socket still answers with an ack
        item = event(1, name, to="follower", token=None)
        await ws.send(json.dumps({"type": "events", "items": [item]}))
        assert await frame(ws) == {"type": "ack", "seq": 1}
    leader = ids[0]
    await agents[0].send(
        json.dumps({"type": "events", "items": [event(2, name, token=1, leader=leader)]})
    )
    assert await frame(agents[0]) == {"type": "ack", "seq": 2}
    for viewer in viewers:  # each browser socket still gets the live update naming the leader
        await viewer.until(leader)
    for ws in agents + [v.ws for v in viewers]:
        await ws.close()
    assert "Timeout reading" not in dashboard.log()
