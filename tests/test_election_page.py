"""The election page, live: its websocket gets frames when its election changes and none when
another one does; in real Chromium it follows a leader change without a reload and draws the
timeline of terms with the gap between them."""

from __future__ import annotations

import asyncio
import html
import json
import re
import uuid
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect
from websockets.asyncio.client import ClientConnection

from tests.helpers import event, run_async
from tests.live import (
    LiveDashboard,
    LiveViewer,
    create_user,
    frame,
    hello_many,
    log_in,
    open_live,
    start_dashboard,
)
from tests.test_browser import browser  # noqa: F401 - the module's Chromium

pytestmark = pytest.mark.live

USER, PASSWORD = "page-watcher", "page-watcher-pw-1"


@pytest.fixture(scope="module")
def session(production_dashboard: LiveDashboard) -> str:
    create_user(production_dashboard, USER, PASSWORD)
    return log_in(production_dashboard, USER, PASSWORD)


@pytest.fixture(scope="module")
def fleet(production_dashboard: LiveDashboard) -> Iterator[dict[str, str]]:
    """Names: ``mine`` and ``other`` for the socket test, ``drawn`` for the browser's."""
    suffix = uuid.uuid4().hex[:6]
    names = {
        "mine": f"page/{suffix}/mine",
        "other": f"page/{suffix}/other",
        "drawn": f"page/{suffix}/drawn",
    }
    yield {**names, "owner": f"owner-{suffix}", "rival": f"rival-{suffix}"}


def live_url(dashboard: LiveDashboard, session: str, name: str) -> str:
    """The page's own websocket query, as the browser reads it from ``ws-connect``."""
    request_page = dashboard.url + f"/elections/{name}/"
    import urllib.request

    request = urllib.request.Request(request_page, headers={"Cookie": f"sessionid={session}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read().decode()
    found = re.search(r'ws-connect="/ws/live/\?([^"]+)"', text)
    assert found, "the election page opens no live socket"
    return html.unescape(found.group(1))


async def report(ws: ClientConnection, *items: dict) -> None:
    await ws.send(json.dumps({"type": "events", "items": list(items)}))
    assert (await frame(ws))["type"] == "ack"


async def test_the_page_gets_frames_for_its_election_only(
    production_dashboard: LiveDashboard, session: str, fleet: dict[str, str]
) -> None:
    dashboard = production_dashboard
    owner = fleet["owner"]
    token = dashboard.tokens([owner])[owner]
    agent = await hello_many(dashboard, owner, [fleet["mine"], fleet["other"]], token)
    await report(
        agent,
        event(1, fleet["mine"], token=1, leader=owner),
        event(2, fleet["other"], leader=owner),
    )
    viewer = LiveViewer(
        await open_live(dashboard, session, live_url(dashboard, session, fleet["mine"]))
    )
    snapshot = "".join(await viewer.drain())
    assert 'id="election-head"' in snapshot and 'data-testid="timeline"' in snapshot
    assert 'id="election-rows"' not in snapshot  # a page of its own, not the map's

    # Another election changes, many times: nothing for this page.
    for i in range(5):
        await report(agent, event(3 + i, fleet["other"], token=10 + i, leader=owner))
    with pytest.raises(TimeoutError):
        await viewer.next(timeout=1.5)

    # Its own election changes: the sections come, with the new term.
    await report(agent, event(8, fleet["mine"], token=7, leader=owner))
    text = await viewer.until('id="election-head"', timeout=5)
    assert 'data-testid="token">7<' in text
    rest = "".join(await viewer.drain())
    assert "election-terms" in text + rest and "election-members" in text + rest
    await viewer.ws.close()
    await agent.close()


@pytest.fixture(scope="module")
def quick_redraw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveDashboard]:
    dashboard = start_dashboard(
        tmp_path_factory.mktemp("quick-redraw"),
        production=False,
        extra_env={"ELECTORATE_LIVE_PAGE_REDRAW": "2"},
    )
    create_user(dashboard, USER, PASSWORD)
    yield dashboard
    dashboard.stop()


async def test_a_quiet_page_is_drawn_again_so_its_timeline_reaches_now(
    quick_redraw: LiveDashboard,
) -> None:
    owner = f"quiet-{uuid.uuid4().hex[:6]}"
    name = f"page/{owner}"
    agent = await hello_many(quick_redraw, owner, [name], quick_redraw.tokens([owner])[owner])
    await report(agent, event(1, name, token=1, leader=owner))
    await agent.close()
    session = log_in(quick_redraw, USER, PASSWORD)
    viewer = LiveViewer(
        await open_live(quick_redraw, session, live_url(quick_redraw, session, name))
    )
    first = "".join(await viewer.drain(0.5))
    later = await viewer.until('data-testid="timeline"', timeout=5)
    drawn = re.compile(r"drawn (\d\d:\d\d:\d\d) UTC")
    assert drawn.search(later).group(1) > drawn.search(first).group(1)  # type: ignore[union-attr]
    await viewer.ws.close()


# Async tests run before the browser test: Playwright's sync API keeps an event loop running
# in this thread for the rest of the module.
def test_the_page_follows_a_leader_change_without_a_reload_and_draws_the_gap(
    browser: Browser,  # noqa: F811
    production_dashboard: LiveDashboard,
    session: str,
    fleet: dict[str, str],
) -> None:
    dashboard = production_dashboard
    name, owner, rival = fleet["drawn"], fleet["owner"], fleet["rival"]

    async def lead() -> None:
        agent = await hello_many(dashboard, owner, [name], dashboard.tokens([owner])[owner])
        await report(agent, event(50, name, token=7, leader=owner))
        await agent.close()

    run_async(lead())
    page: Page = browser.new_page()
    blocked: list[str] = []
    page.on("console", lambda m: blocked.append(m.text) if "Content Security" in m.text else None)
    page.goto(dashboard.url + f"/login/?next=/elections/{name}/")
    page.get_by_label("Username").fill(USER)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#live-state")).to_have_text("live updates: connected")
    head = page.locator("#election-head")
    expect(head.get_by_test_id("leader")).to_have_text(owner)
    page.evaluate("window.notReloaded = true")
    chart = page.get_by_test_id("timeline")
    expect(chart.locator("g.seg.term")).to_have_count(1)
    expect(chart.locator("g.seg.gap")).to_have_count(0)

    async def hand_over() -> None:
        tokens = dashboard.tokens([owner, rival])
        old = await hello_many(dashboard, owner, [name], tokens[owner])
        new = await hello_many(dashboard, rival, [name], tokens[rival])
        resign = event(100, name, to="follower", token=7, reason="resigned")
        resign["from"] = "leader"
        await report(old, resign)
        await asyncio.sleep(1.0)  # a second without a leader
        await report(new, event(1, name, token=8, leader=rival))
        await old.close()
        await new.close()

    run_async(hand_over())
    expect(head.get_by_test_id("leader")).to_have_text(rival)
    expect(head.get_by_test_id("token")).to_have_text("8")
    expect(chart.locator("g.seg.term")).to_have_count(2)
    gap = chart.locator("g.seg.gap").first
    expect(gap).to_have_count(1)
    expect(chart.locator('g.seg.term[data-end-reason="resigned"]')).to_have_attribute(
        "data-leader", owner
    )
    # Both agents went away after reporting: once the page says so, it is quiet.
    connected = page.locator("#election-members tr[data-member] td:nth-child(5)")
    expect(connected).to_have_text(["no", "no"])
    assert float(gap.get_attribute("data-width") or 0) > 0
    # The gap is red, drawn with a real box.
    expect(gap.locator("rect")).to_have_css("fill", "rgb(248, 81, 73)")
    assert gap.locator("rect").bounding_box()["width"] >= 1  # type: ignore[index]
    assert page.evaluate("window.notReloaded") is True
    assert blocked == []
