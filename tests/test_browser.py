"""End to end in real headless Chromium: log in, see a leader, kill the leading agent's
process, see the new leader appear without a reload."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from demo import fleet as demo
from tests.live import LiveDashboard, create_user, demo_fleet, start_dashboard

pytestmark = [pytest.mark.browser, pytest.mark.live]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium", pytrace=False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def demo_dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveDashboard]:
    """The demo, as `make demo` runs it: an embedded dashboard with only the demo fleet on it
    (other modules' elections would push the demo's off the map's first page)."""
    dashboard = start_dashboard(tmp_path_factory.mktemp("demo"), production=False)
    yield dashboard
    dashboard.stop()


@pytest.fixture(scope="module")
def fleet(demo_dashboard: LiveDashboard, tmp_path_factory) -> Iterator[dict]:
    with demo_fleet(demo_dashboard, tmp_path_factory.mktemp("fleet")) as procs:
        yield procs


def one_of(names: list[str]) -> re.Pattern[str]:
    return re.compile("^(" + "|".join(map(re.escape, names)) + ")$")


def log_in(page: Page, dashboard: LiveDashboard) -> None:
    create_user(dashboard, "sre", "correct-horse-battery")
    page.goto(dashboard.url + "/")
    expect(page).to_have_url(dashboard.url + "/login/?next=/")
    page.get_by_label("Username").fill("sre")
    page.get_by_label("Password").fill("correct-horse-battery")
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(dashboard.url + "/")


def test_step_down_from_the_map_with_confirmation(
    browser: Browser, demo_dashboard: LiveDashboard, fleet: dict
) -> None:
    page = browser.new_page()
    blocked: list[str] = []  # what the Content-Security-Policy refused: nothing may be
    page.on("console", lambda m: blocked.append(m.text) if "Content Security" in m.text else None)
    log_in(page, demo_dashboard)
    row = page.locator(
        "#election-rows tr", has=page.get_by_role("link", name="search/shard-1", exact=True)
    )
    leader_cell = row.get_by_test_id("leader")
    expect(leader_cell).to_have_text(one_of(demo.AGENTS), timeout=15_000)
    old_leader = leader_cell.inner_text()
    old_token = int(row.get_by_test_id("token").inner_text())
    page.evaluate("window.__notReloaded = true")

    row.get_by_role("button", name="Step down search/shard-1").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    # No reason, no command: the browser's required field stops the submit.
    dialog.get_by_role("button", name="Step down").click()
    expect(dialog.get_by_label("Reason (required, goes to the audit log)")).to_be_focused()
    dialog.get_by_label("Reason (required, goes to the audit log)").fill("rotate leadership")
    dialog.get_by_role("button", name="Step down").click()
    expect(dialog.get_by_test_id("command-status")).to_have_text("done", timeout=15_000)
    others = [a for a in demo.AGENTS if a != old_leader]
    expect(leader_cell).to_have_text(one_of(others), timeout=5_000)
    assert int(row.get_by_test_id("token").inner_text()) > old_token
    assert page.evaluate("window.__notReloaded") is True
    dialog.get_by_role("button", name="Close").click()
    expect(dialog).to_be_hidden()
    assert blocked == []


def test_a_killed_leader_is_replaced_live_on_the_map(
    browser: Browser, demo_dashboard: LiveDashboard, fleet: dict
) -> None:
    page = browser.new_page()
    external: list[str] = []
    page.on(
        "request",
        lambda r: external.append(r.url) if not r.url.startswith(demo_dashboard.url) else None,
    )
    log_in(page, demo_dashboard)

    row = page.locator(
        "#election-rows tr", has=page.get_by_role("link", name="billing/cluster", exact=True)
    )
    leader_cell = row.get_by_test_id("leader")
    expect(leader_cell).to_have_text(one_of(demo.AGENTS), timeout=15_000)
    expect(row.locator(".status")).to_have_text("led")
    expect(page.locator("#live-state")).to_have_text("live updates: connected")
    old_leader = leader_cell.inner_text()
    old_token = int(row.get_by_test_id("token").inner_text())

    # Mark this page: a reload would lose the mark.
    page.evaluate("window.__notReloaded = true")
    fleet[old_leader].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()

    others = [a for a in demo.AGENTS if a != old_leader]
    expect(leader_cell).to_have_text(one_of(others), timeout=15_000)
    took = time.monotonic() - killed_at
    assert int(row.get_by_test_id("token").inner_text()) > old_token
    assert page.evaluate("window.__notReloaded") is True
    # The killed agent shows as offline among the members.
    expect(row.locator(".member.offline")).to_have_text(f"{old_leader}offline", timeout=10_000)
    assert external == [], f"the page fetched from elsewhere: {external}"
    print(f"new leader on the page {took:.2f}s after the kill")
