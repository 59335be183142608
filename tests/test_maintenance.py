"""Maintenance windows that end by themselves: pause until a time, resumed by the sweep."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.contrib.auth.models import Group, User
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from elections import actions, commands, tasks
from elections.broadcast import FLEET_GROUP
from elections.models import AuditEntry, Election
from tests.helpers import hello

pytestmark = pytest.mark.django_db

NAME = "billing/cluster"


@pytest.fixture
def operator() -> User:
    actions.register_agent(hello("a", NAME, "other/1"))
    user = User.objects.create_user("oncall", password="x" * 12)
    user.groups.add(Group.objects.get(name="operators"))
    return User.objects.get(pk=user.pk)


def election(name: str = NAME) -> Election:
    return Election.objects.get(name=name)


def test_a_window_ends_by_itself_audited_and_announced(
    operator: User, django_capture_on_commit_callbacks
) -> None:
    until = timezone.now() + timedelta(hours=1)
    commands.set_paused(operator, NAME, True, "db migration", until=until)
    commands.set_paused(operator, "other/1", True, "open-ended")  # no end: stays paused
    assert election().paused_until == until
    assert tasks.end_maintenance_windows() == []  # not yet
    assert election().paused

    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(FLEET_GROUP, channel)
    Election.objects.filter(name=NAME).update(paused_until=timezone.now() - timedelta(seconds=1))
    with django_capture_on_commit_callbacks(execute=True):
        assert tasks.end_maintenance_windows() == [NAME]
    message = async_to_sync(asyncio.wait_for)(layer.receive(channel), 2)
    assert message == {"type": "fleet.changed", "elections": [election().pk]}

    e = election()
    assert (e.paused, e.paused_reason, e.paused_until) == (False, "", None)
    assert election("other/1").paused
    entry = AuditEntry.objects.filter(action=AuditEntry.Action.RESUMED).get()
    assert (entry.actor_type, entry.actor, entry.target) == ("system", "system", NAME)
    assert entry.detail["reason"] == "window ended"
    assert entry.detail["paused_for"] == "db migration"
    assert tasks.end_maintenance_windows() == []  # once


def test_the_periodic_schedule_runs_it(operator: User) -> None:
    assert tasks.end_maintenance_windows in [task for task, _ in tasks.PERIODIC]
    commands.set_paused(operator, NAME, True, "kernel", until=timezone.now() + timedelta(hours=1))
    Election.objects.update(paused_until=timezone.now() - timedelta(seconds=1))
    tasks.sweep()
    assert not election().paused


def test_commands_are_refused_during_the_window_and_accepted_after(operator: User) -> None:
    commands.set_paused(operator, NAME, True, "kernel", until=timezone.now() + timedelta(hours=1))
    with pytest.raises(commands.Refused, match="paused"):
        commands.request_stepdown(operator, commands.Request(election=NAME, reason="x"))
    commands.end_windows(now=timezone.now() + timedelta(hours=2))
    command = commands.request_stepdown(operator, commands.Request(election=NAME, reason="x"))
    assert command.pk is not None  # accepted (it then fails: this election has no leader)


def test_a_window_must_end_in_the_future_and_a_manual_resume_clears_it(operator: User) -> None:
    with pytest.raises(commands.Refused, match="future"):
        commands.set_paused(
            operator, NAME, True, "late", until=timezone.now() - timedelta(minutes=1)
        )
    commands.set_paused(operator, NAME, True, "kernel", until=timezone.now() + timedelta(hours=1))
    commands.set_paused(operator, NAME, False)
    assert election().paused_until is None


def test_the_api_the_form_and_ctl_take_an_end(operator: User) -> None:
    client = Client()
    client.force_login(operator)
    before = timezone.now()
    answer = client.post(
        f"/api/v1/elections/{NAME}/pause",
        {"reason": "db migration", "until": "2h"},
        content_type="application/json",
    )
    assert answer.status_code == 200, answer.content
    assert answer.json()["paused"] is True and answer.json()["paused_until"]
    until = election().paused_until
    assert until is not None and timedelta(hours=2) <= until - before < timedelta(
        hours=2, minutes=1
    )
    page = client.get(f"/elections/{NAME}/").content.decode()
    assert "resumes by itself" in page
    assert (
        client.post(
            f"/api/v1/elections/{NAME}/pause", {"paused": False}, content_type="application/json"
        ).json()["paused"]
        is False
    )
    bad = client.post(
        f"/api/v1/elections/{NAME}/pause",
        {"reason": "x", "until": "soon"},
        content_type="application/json",
    )
    assert bad.status_code == 400

    client.post(
        f"/elections/{NAME}/pause", {"paused": "1", "reason": "r", "until": "2026-12-24T08:00"}
    )
    assert election().paused_until.isoformat() == "2026-12-24T08:00:00+00:00"
    commands.set_paused(operator, NAME, False)

    call_command("ctl", "pause", NAME, "--user", "oncall", "--reason", "r", "--until", "90m")
    until = election().paused_until
    assert until is not None and timedelta(minutes=89) < until - timezone.now() <= timedelta(
        minutes=90
    )


def test_the_api_pause_needs_the_permission(operator: User) -> None:
    client = Client()
    client.force_login(User.objects.create_user("viewer", password="x" * 12))
    answer = client.post(
        f"/api/v1/elections/{NAME}/pause", {"reason": "x"}, content_type="application/json"
    )
    assert answer.status_code == 403 and not election().paused


def test_the_map_shows_the_window_and_drops_it_when_it_ends(operator: User) -> None:
    client = Client()
    client.force_login(operator)
    until = timezone.now() + timedelta(hours=1)
    commands.set_paused(operator, NAME, True, "kernel", until=until)
    row = client.get("/").content.decode().split(f'data-election="{NAME}"')[1].split("</tr>")[0]
    assert f"paused until {until:%H:%M}" in row
    commands.end_windows(now=until)
    row = client.get("/").content.decode().split(f'data-election="{NAME}"')[1].split("</tr>")[0]
    assert 'data-testid="paused"' not in row
