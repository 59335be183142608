"""Lease health through the real heartbeat path: a leader whose heartbeats report less than a
third of its TTL left turns its election lease-late (on the map, live, and in the API), and
each agent's clock skew, measured from its heartbeats, is written with the liveness flush and
flagged past ``ELECTORATE_CLOCK_SKEW_WARN``."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.helpers import event, eventually
from tests.live import LiveDashboard, LiveViewer, create_user, frame, log_in, open_live

pytestmark = pytest.mark.live

TTL = 9.0


@pytest.fixture(scope="module")
def session(production_dashboard: LiveDashboard) -> str:
    create_user(production_dashboard, "lease-watcher", "lease-watcher-pw-1")
    return log_in(production_dashboard, "lease-watcher", "lease-watcher-pw-1")


async def agent(dashboard: LiveDashboard, agent_id: str, names: list[str]) -> ClientConnection:
    ws = await connect(
        dashboard.ws_agent,
        additional_headers={"Authorization": f"Bearer {dashboard.token(agent_id)}"},
    )
    elections = [{"name": n, "backend": "etcd", "ttl": TTL} for n in names]
    await ws.send(json.dumps({"type": "hello", "agent": agent_id, "elections": elections}))
    assert (await frame(ws))["type"] == "ack"
    return ws


async def beat(ws: ClientConnection, states: dict[str, Any], *, ahead: float = 0.0) -> None:
    at = datetime.now(UTC) + timedelta(seconds=ahead)
    await ws.send(json.dumps({"type": "heartbeat", "at": at.isoformat(), "states": states}))


def leading(agent_id: str, ttl_left: float) -> dict[str, Any]:
    return {"state": "leader", "leader": agent_id, "token": 1, "ttl_left": ttl_left}


async def led(dashboard: LiveDashboard, prefix: str, ttl_left: float) -> tuple[str, str, Any]:
    """A new agent leading a new election, its first heartbeat sent: (agent, name, socket)."""
    agent_id = f"{prefix}-{uuid.uuid4().hex[:6]}"
    name = f"lease/{agent_id}"
    ws = await agent(dashboard, agent_id, [name])
    await ws.send(json.dumps({"type": "events", "items": [event(1, name, leader=agent_id)]}))
    await frame(ws)
    await beat(ws, {name: leading(agent_id, ttl_left)})
    return agent_id, name, ws


async def watch(dashboard: LiveDashboard, session: str, name: str) -> LiveViewer:
    """The live map filtered to ``name``, its snapshot read."""
    viewer = LiveViewer(await open_live(dashboard, session, urllib.parse.urlencode({"q": name})))
    await viewer.until(name)
    return viewer


async def close(*sockets: ClientConnection) -> None:
    await asyncio.gather(*(ws.close() for ws in sockets))


async def healthy_then_close(
    dashboard: LiveDashboard, session: str, name: str, *sockets: ClientConnection
) -> None:
    """The API says the lease is not late; then the sockets close."""
    assert election(dashboard, session, name)["lease"]["late"] is False
    await close(*sockets)


def election(dashboard: LiveDashboard, session: str, name: str) -> dict[str, Any]:
    return dashboard.get_json(f"/api/v1/elections/{name}", session)  # type: ignore[return-value]


async def test_a_leader_missing_renewals_turns_lease_late_live_and_recovers(
    production_dashboard: LiveDashboard, session: str
) -> None:
    dashboard = production_dashboard
    agent_id, name, ws = await led(dashboard, "late", TTL - 0.5)
    lease = await eventually(lambda: election(dashboard, session, name)["lease"])
    assert lease["late"] is False and lease["ttl"] == TTL  # type: ignore[index]

    viewer = await watch(dashboard, session, name)
    # Two renewals missed: less than a third of the TTL is left at this heartbeat.
    await beat(ws, {name: leading(agent_id, TTL / 3 - 0.5)})
    row = await viewer.until('data-testid="lease-late"', timeout=5)
    assert "row-lease-late" in row and name in row
    assert election(dashboard, session, name)["lease"]["late"] is True
    page = urllib.parse.urlencode({"status": "lease-late"})
    found = dashboard.get_json(f"/api/v1/elections?{page}", session)["elections"]  # type: ignore[index]
    assert [e["name"] for e in found] == [name]

    # Renewed again: back to led, live too.
    await beat(ws, {name: leading(agent_id, TTL - 0.2)})
    text = await viewer.until(f'data-election="{name}"', timeout=5)
    while "row-lease-late" in text:  # frames of the late update still on their way
        text = await viewer.until(f'data-election="{name}"', timeout=5)
    assert 'data-testid="lease-late"' not in text
    await healthy_then_close(dashboard, session, name, viewer.ws, ws)


async def test_renewals_that_only_renew_stay_out_of_the_way(
    production_dashboard: LiveDashboard, session: str
) -> None:
    """A healthy leader's heartbeats are renewals: no frame for any browser, never late."""
    dashboard = production_dashboard
    agent_id, name, ws = await led(dashboard, "calm", TTL)
    viewer = await watch(dashboard, session, name)
    await viewer.drain(1.5)  # the rest of the snapshot, and the first beat's redraw
    for left in (TTL - 1, TTL - 2.5, TTL - 0.1):  # at least two thirds left each time
        await beat(ws, {name: leading(agent_id, left)})
    with pytest.raises(TimeoutError):
        await viewer.next(timeout=2)
    await healthy_then_close(dashboard, session, name, viewer.ws, ws)


async def test_clock_skew_is_measured_from_heartbeats_and_flagged(
    production_dashboard: LiveDashboard, session: str
) -> None:
    dashboard = production_dashboard
    fast_id, good_id = (f"{x}-{uuid.uuid4().hex[:6]}" for x in ("fast", "good"))
    name = f"skew/{fast_id}"
    fast = await agent(dashboard, fast_id, [name])
    good = await agent(dashboard, good_id, [name])
    viewer = await watch(dashboard, session, name)
    follower = {"state": "follower", "leader": None, "token": None}
    for _ in range(3):
        await beat(fast, {name: follower}, ahead=4.0)  # this agent's clock runs 4 s ahead
        await beat(good, {name: follower})
        await asyncio.sleep(0.2)
    # Crossing the threshold redraws the rows of the agent's elections.
    row = await viewer.until('data-testid="skew"', timeout=5)
    assert fast_id in row and "clock +4." in row

    def agents() -> dict[str, dict[str, Any]]:
        found = dashboard.get_json("/api/v1/agents", session)["agents"]  # type: ignore[index]
        return {a["id"]: a for a in found if a["id"] in (fast_id, good_id)}

    both: Any = await eventually(
        lambda: (a := agents()) and all(x["clock_skew"] for x in a.values()) and a
    )
    assert both[fast_id]["clock_skew"] == pytest.approx(4.0, abs=0.5)
    assert both[fast_id]["clock_skewed"] is True
    assert abs(both[good_id]["clock_skew"]) < 0.5 and both[good_id]["clock_skewed"] is False
    members = {m["agent"]: m for m in election(dashboard, session, name)["members"]}
    assert members[fast_id]["clock_skew"] == pytest.approx(4.0, abs=0.5)
    await close(viewer.ws, fast, good)
