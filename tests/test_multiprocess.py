"""Several server processes of one dashboard, joined by the Redis channel layer: an agent
connected to process 1 obeys a step-down requested through process 2, and browsers on
either process see the new leader."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import pytest

from tests.live import (
    LiveDashboard,
    LiveViewer,
    api,
    create_user,
    demo_fleet,
    log_in,
    open_live,
    own_production_dashboard,
)

pytestmark = pytest.mark.live

ELECTION = "search/shard-1"


# A dashboard of its own: the demo fleet's Raft terms start at 1 again, and another module's
# fleet may already have taken these elections to higher terms.
first = own_production_dashboard("first", "module")


@pytest.fixture(scope="module")
def second(first: LiveDashboard) -> LiveDashboard:
    return first.another_process()


@pytest.fixture(scope="module")
def fleet(first: LiveDashboard, tmp_path_factory) -> Iterator[dict]:
    # The agents talk to process 1 only.
    with demo_fleet(first, tmp_path_factory.mktemp("mp-fleet")) as procs:
        yield procs


async def test_a_step_down_through_process_2_reaches_an_agent_on_process_1(
    first: LiveDashboard, second: LiveDashboard, fleet: dict
) -> None:
    create_user(first, "mp-operator", "mp-password-123")
    token = first.manage("create_api_token", "mp-operator").strip()
    session = log_in(second, "mp-operator", "mp-password-123")  # one login serves both
    viewers = [
        LiveViewer(await open_live(first, session, "q=shard-1")),
        LiveViewer(await open_live(second, session, "q=shard-1")),
    ]
    for viewer in viewers:
        await viewer.next()

    async def led() -> dict:
        for _ in range(200):
            data = api(second, token, "GET", f"/api/v1/elections/{ELECTION}")
            followers = [m for m in data["members"] if m["state"] == "follower"]
            if data["status"] == "led" and data["leader_connected"] and len(followers) == 2:
                return data
            await asyncio.sleep(0.1)
        raise AssertionError(f"{ELECTION} never settled: {data}")

    before = await led()
    answer = api(
        second,
        token,
        "POST",
        f"/api/v1/elections/{ELECTION}/step-down",
        {"reason": "rotate from the other process"},
    )
    command = answer["command"]
    assert command["status"] == "done", command
    assert command["new_leader"] != before["leader"] and command["new_token"] > before["token"]
    new = command["new_leader"]
    for viewer in viewers:  # both processes' browsers show the new leader in the row
        await viewer.until(f'data-testid="leader">{new}<', timeout=10)
    # Every server process serves the same state.
    after = api(first, token, "GET", f"/api/v1/elections/{ELECTION}")
    assert after["leader"] == new and after["token"] == command["new_token"]
    log = (second.workdir / f"server-{second.url.rsplit(':', 1)[1]}.log").read_text()
    assert not re.search(r"Traceback", log), log[-2000:]
    for viewer in viewers:
        await viewer.ws.close()
