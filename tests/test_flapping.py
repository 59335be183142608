"""Flapping: more than ELECTORATE_FLAP_CHANGES new terms within ELECTORATE_FLAP_WINDOW flag an
election, audited and shown; it clears by itself once the window is quiet again."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

import protocol
from elections import actions, flapping, tasks
from elections.broadcast import FLEET_GROUP
from elections.models import AuditEntry, Election, Webhook, WebhookEvent
from tests.helpers import hello, parsed_event

pytestmark = pytest.mark.django_db


class Seat:
    """Two agents handing an election's seat back and forth, one new term per ``change``."""

    def __init__(self, *names: str) -> None:
        self.names = names or ("e/1",)
        for agent in ("a", "b"):
            actions.register_agent(hello(agent, *self.names))
        self.seq = {"a": 0, "b": 0}
        self.token = 0

    def change(self, at: datetime, names: tuple[str, ...] | None = None) -> None:
        self.token += 1
        agent = "ab"[self.token % 2]
        events = []
        for name in names or self.names:
            self.seq[agent] += 1
            events.append(parsed_event(self.seq[agent], name, "leader", self.token, at=at))
        actions.ingest_events(agent, events)


def flapping_since(name: str = "e/1") -> datetime | None:
    return Election.objects.get(name=name).flapping_since


def entries(action: str) -> list[AuditEntry]:
    return list(AuditEntry.objects.filter(action=action))


def test_three_changes_in_five_minutes_do_not_flap_the_fourth_does() -> None:
    now = datetime.now(UTC)
    seat = Seat()
    for minute in (4, 3, 2):
        seat.change(now - timedelta(minutes=minute))
    assert flapping_since() is None, "3 changes in 5 minutes are not more than 3"
    assert not entries("flapping")
    seat.change(now - timedelta(minutes=1))
    assert flapping_since() is not None
    [entry] = entries("flapping")
    assert (entry.target, entry.actor_type) == ("e/1", "system")
    assert entry.detail == {"changes": 4, "threshold": 3, "window_seconds": 300.0}
    seat.change(now)  # still flapping: no second entry
    assert len(entries("flapping")) == 1


def test_the_threshold_and_window_are_settings(settings) -> None:
    settings.ELECTORATE_FLAP_CHANGES, settings.ELECTORATE_FLAP_WINDOW = 1, 60
    now = datetime.now(UTC)
    seat = Seat()
    seat.change(now - timedelta(seconds=90))
    seat.change(now - timedelta(seconds=30))
    assert flapping_since() is None  # the first change is out of the window
    seat.change(now)
    assert flapping_since() is not None


def test_a_burst_replayed_late_from_a_spool_does_not_flap() -> None:
    long_ago = datetime.now(UTC) - timedelta(hours=2)
    seat = Seat()
    for second in range(6):
        seat.change(long_ago + timedelta(seconds=second))
    assert flapping_since() is None


def test_it_clears_by_itself_and_says_so(django_capture_on_commit_callbacks) -> None:
    now = datetime.now(UTC)
    seat = Seat()
    for second in range(4):
        seat.change(now - timedelta(seconds=60 - second))
    since = flapping_since()
    assert since is not None
    # Nothing to clear while the window still holds the burst.
    assert flapping.settle(now) == []
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(FLEET_GROUP, channel)
    with django_capture_on_commit_callbacks(execute=True):
        cleared = flapping.settle(now + timedelta(minutes=5))
    election = Election.objects.get()
    assert cleared == [election.pk]
    assert election.flapping_since is None
    [entry] = entries("flapping-cleared")
    assert entry.detail["changes"] == 0
    assert entry.detail["flapping_since"] == since.isoformat()

    async def announced() -> dict:
        return await asyncio.wait_for(layer.receive(channel), timeout=5)

    message = async_to_sync(announced)()
    assert message == {"type": "fleet.changed", "elections": [election.pk]}
    # The periodic task runs it.
    assert tasks.settle_flapping in [task for task, _ in tasks.PERIODIC]


def test_a_quiet_window_clears_on_the_next_change_too() -> None:
    now = datetime.now(UTC)
    seat = Seat()
    for second in range(4):
        seat.change(now - timedelta(minutes=20) + timedelta(seconds=second))
    # Judged on ingest against the dashboard's clock: those four are long past.
    assert flapping_since() is None
    with_flag = Election.objects.get()
    with_flag.flapping_since = now - timedelta(minutes=20)
    with_flag.save()
    seat.change(now)
    assert flapping_since() is None
    assert len(entries("flapping-cleared")) == 1


def test_detecting_flapping_costs_the_same_for_one_election_or_a_hundred() -> None:
    names = tuple(f"e/{i}" for i in range(100))
    now = datetime.now(UTC)
    seat = Seat(*names)
    for second in range(3):
        seat.change(now - timedelta(seconds=30 - second))

    def fourth(names: tuple[str, ...]) -> int:
        with CaptureQueriesContext(connection) as queries:
            seat.change(now, names)
        return len(queries.captured_queries)

    one = fourth(names[:1])
    assert flapping_since("e/0") is not None and flapping_since("e/1") is None
    many = fourth(names[1:])
    assert many == one
    assert Election.objects.filter(flapping_since__isnull=False).count() == 100
    assert len(entries("flapping")) == 100


def test_flapping_shows_on_the_map_and_in_the_api(sre: Client) -> None:
    now = datetime.now(UTC)
    Seat("calm/1")
    seat = Seat()
    client = sre
    page = client.get("/").content.decode()
    assert 'data-testid="flapping"' not in page
    for second in range(4):
        seat.change(now - timedelta(seconds=10 - second))

    page = client.get("/").content.decode()
    assert page.count('data-testid="flapping"') == 2  # needs attention, and its row
    assert 'data-testid="flapping-count"' in page
    only = client.get("/", {"status": "flapping"}).content.decode()
    assert 'data-election="e/1"' in only and 'data-election="calm/1"' not in only
    detail = client.get("/api/v1/elections/e/1").json()
    assert detail["flapping"] is True
    assert detail["flapping_since"] == flapping_since().isoformat()
    calm = client.get("/api/v1/elections/calm/1").json()
    assert (calm["flapping"], calm["flapping_since"]) == (False, None)


def test_a_resumed_term_is_not_a_change() -> None:
    """The same leader proving the same term again (its lease lapsed under load)."""
    now = datetime.now(UTC)
    actions.register_agent(hello("a", "e/1"))
    events = []
    for i in range(6):
        at = now - timedelta(seconds=30 - i)
        events.append(parsed_event(2 * i + 1, "e/1", "leader", 7, at=at))
        events.append(
            parsed_event(
                2 * i + 2,
                "e/1",
                "follower",
                7,
                from_="leader",
                at=at + timedelta(milliseconds=500),
                reason=protocol.EndReason.EXPIRED,
            )
        )
    actions.ingest_events("a", events)
    assert flapping_since() is None


def test_a_webhook_hears_when_flapping_starts_and_when_it_clears() -> None:
    Webhook.objects.create(name="pager", url="http://127.0.0.1:9/", events=["flapping"])
    now = datetime.now(UTC)
    seat = Seat()
    for second in range(4):
        seat.change(now - timedelta(seconds=60 - second))
    flapping.settle(now + timedelta(minutes=5))
    sent = [(e.kind, e.election, e.detail["flapping"]) for e in WebhookEvent.objects.all()]
    assert sent == [("flapping", "e/1", True), ("flapping", "e/1", False)]
