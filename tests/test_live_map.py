"""The live map against a real server with a small frame limit, so a page of rows must be
split across frames: no frame over the limit, flow control, and real htmx applying it."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, expect
from websockets.exceptions import ConnectionClosed

from dashboard.web import live
from tests.helpers import event, run_async
from tests.live import (
    LiveDashboard,
    LiveViewer,
    create_user,
    frame,
    hello_many,
    log_in,
    log_out,
    open_live,
    start_dashboard,
)
from tests.test_browser import browser  # noqa: F401 - the module's Chromium

pytestmark = pytest.mark.live

LIMIT = 8 * 1024
ELECTIONS = 230  # three pages


@pytest.fixture(scope="module")
def small_frames(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveDashboard]:
    dashboard = start_dashboard(
        tmp_path_factory.mktemp("small-frames"),
        production=False,
        extra_env={"ELECTORATE_LIVE_FRAME_LIMIT": str(LIMIT)},
    )
    create_user(dashboard, "pager", "pager-password-1")
    yield dashboard
    dashboard.stop()


@pytest.fixture(scope="module")
def names(small_frames: LiveDashboard) -> list[str]:
    names = [f"fleet/{i:04d}" for i in range(ELECTIONS)]

    async def register() -> None:
        token = small_frames.tokens(["fleet-agent"])["fleet-agent"]
        ws = await hello_many(small_frames, "fleet-agent", names, token, cluster="eu-1")
        items = [event(i + 1, n, token=1, leader="fleet-agent") for i, n in enumerate(names)]
        for start in range(0, len(items), 100):
            await ws.send(json.dumps({"type": "events", "items": items[start : start + 100]}))
            await frame(ws)
        await ws.close()

    run_async(register())
    return names


async def test_no_frame_exceeds_the_limit_and_the_page_arrives_whole(
    small_frames: LiveDashboard, names: list[str]
) -> None:
    viewer = LiveViewer(
        await open_live(small_frames, log_in(small_frames, "pager", "pager-password-1"))
    )
    frames = []
    while True:
        try:
            frames.append(await viewer.next(timeout=2))
        except TimeoutError:
            break
    assert len(frames) > 3
    assert max(len(f.encode()) for f in frames) <= LIMIT
    body = "".join(frames)
    assert len(re.findall(r'<tr id="election-\d+"', body)) == 100  # one page, not 230 rows
    assert "of 230" in body
    await viewer.ws.close()


async def test_a_browser_that_falls_behind_gets_a_snapshot_not_the_backlog(
    small_frames: LiveDashboard, names: list[str]
) -> None:
    session = log_in(small_frames, "pager", "pager-password-1")
    slow = LiveViewer(await open_live(small_frames, session))
    while True:  # it reads its snapshot but acks nothing, like a frozen tab
        try:
            await slow.next(ack=False, timeout=1)
        except TimeoutError:
            break
    await asyncio.sleep(live.MAX_LAG)
    agent_id = f"churn-{uuid.uuid4().hex[:6]}"
    token = small_frames.tokens([agent_id])[agent_id]
    target = names[:5]
    agent = await hello_many(small_frames, agent_id, target, token)
    for i in range(10):  # separate changes on its page, each its own update
        item = event(i + 1, target[i % 5], token=100 + i, leader=agent_id)
        await agent.send(json.dumps({"type": "events", "items": [item]}))
        await frame(agent)
        await asyncio.sleep(0.12)
    with pytest.raises(TimeoutError):
        await slow.next(ack=False, timeout=1)  # no backlog queued up for it
    # It catches up: what comes next is a fresh snapshot with every change in it.
    await slow.ack()
    text = await slow.until('<tbody id="election-rows"')
    while f"{100 + 9}</td>" not in text:
        text += await slow.next(timeout=2)
    await agent.close()
    await slow.ws.close()


async def test_a_browser_socket_closes_when_its_session_ends_or_its_account_is_disabled(
    small_frames: LiveDashboard,
) -> None:
    create_user(small_frames, "leaver", "leaver-password-1")
    signed_out = LiveViewer(
        await open_live(small_frames, log_in(small_frames, "leaver", "leaver-password-1"))
    )
    session = log_in(small_frames, "leaver", "leaver-password-1")
    other = LiveViewer(await open_live(small_frames, session))
    await signed_out.next()
    await other.next()
    log_out(small_frames, signed_out.ws.request.headers["Cookie"].split("=", 1)[1])
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await signed_out.next(timeout=10)
    assert info.value.rcvd.code == live.CLOSE_SIGNED_OUT
    # The same user's other browser is still signed in...
    await asyncio.sleep(live.SESSION_CHECK + 0.5)
    assert other.ws.state.name == "OPEN"
    # ...until the account is disabled.
    small_frames.shell(
        "from django.contrib.auth.models import User; "
        "User.objects.filter(username='leaver').update(is_active=False)",
    )
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await other.next(timeout=10)
    assert info.value.rcvd.code == live.CLOSE_SIGNED_OUT


# Async tests run before the browser test: Playwright's sync API keeps an event loop running
# in this thread for the rest of the module.
def test_paging_and_live_rows_in_a_real_browser(
    browser: Browser,  # noqa: F811
    small_frames: LiveDashboard,
    names: list[str],
) -> None:
    page = browser.new_page()
    page.goto(small_frames.url + "/login/?next=/")
    page.get_by_label("Username").fill("pager")
    page.get_by_label("Password").fill("pager-password-1")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#live-state")).to_have_text("live updates: connected")
    expect(page.locator("#election-rows tr[data-election]")).to_have_count(100)
    expect(page.locator("#pager")).to_contain_text("1\u2013100 of 230")
    page.keyboard.press("]")
    expect(page).to_have_url(re.compile(r"\?page=2$"))
    expect(page.locator("#live-state")).to_have_text("live updates: connected")
    # After the snapshot's split frames, the page has exactly its own 100 rows.
    expect(page.locator("#election-rows tr[data-election]")).to_have_count(100)
    expect(page.locator("#election-rows tr[data-election]").first).to_have_attribute(
        "data-election", names[100]
    )
    # Its agent went away after registering: every leader is unverified, and the attention
    # list says how many without drawing them all.
    expect(page.locator("#attention")).to_contain_text("and 180 more")

    async def change() -> None:
        token = small_frames.tokens(["mover"])["mover"]
        ws = await hello_many(small_frames, "mover", [names[150]], token)
        await ws.send(
            json.dumps(
                {"type": "events", "items": [event(1, names[150], token=500, leader="mover")]}
            )
        )
        await frame(ws)
        await ws.close()

    run_async(change())
    row = page.locator(f'#election-rows tr[data-election="{names[150]}"]')
    expect(row.get_by_test_id("leader")).to_have_text("mover")
    expect(row.get_by_test_id("token")).to_have_text("500")
