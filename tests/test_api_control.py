"""The step-down API end to end, in production mode (PostgreSQL, Redis channel layer), with
real agent processes and a bearer API token."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.live import LiveDashboard, api_response, create_user, demo_fleet

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def fleet(production_dashboard: LiveDashboard, tmp_path_factory) -> Iterator[dict]:
    with demo_fleet(production_dashboard, tmp_path_factory.mktemp("api-fleet")) as procs:
        yield procs


def call(
    dashboard: LiveDashboard, method: str, path: str, token: str, body: Any = None
) -> tuple[int, Any]:
    status, raw = api_response(dashboard, token, method, path, body)
    return status, json.loads(raw)


def leader_of(dashboard: LiveDashboard, token: str, name: str) -> dict:
    status, data = call(dashboard, "GET", f"/api/v1/elections/{name}", token)
    assert status == 200, data
    return data


def wait_led(dashboard: LiveDashboard, token: str, name: str) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        data = leader_of(dashboard, token, name)
        if data["status"] == "led" and data["leader_connected"]:
            return data
        time.sleep(0.1)
    raise AssertionError(f"{name} never got a connected leader: {data}")


@pytest.fixture(scope="module")
def operator_token(production_dashboard: LiveDashboard) -> str:
    create_user(production_dashboard, "robot", "robot-password-1")
    return production_dashboard.manage("create_api_token", "robot").strip()


@pytest.fixture(scope="module")
def viewer_token(production_dashboard: LiveDashboard) -> str:
    production_dashboard.shell(
        "from django.contrib.auth.models import User; User.objects.create_user('viewer')",
    )
    return production_dashboard.manage("create_api_token", "viewer").strip()


def test_switchover_through_the_api_ends_with_the_chosen_successor(
    production_dashboard: LiveDashboard, fleet: dict, operator_token: str
) -> None:
    before = wait_led(production_dashboard, operator_token, "billing/cluster")
    successor = next(m["agent"] for m in before["members"] if m["state"] == "follower")
    status, data = call(
        production_dashboard,
        "POST",
        "/api/v1/elections/billing/cluster/step-down",
        operator_token,
        {"reason": "kernel upgrade on the leader", "successor": successor, "drill": True},
    )
    assert status == 200, data
    command = data["command"]
    assert command["status"] == "done", command
    assert command["kind"] == "switchover"
    assert command["new_leader"] == successor
    assert command["new_token"] > before["token"]
    assert command["gap"] is not None and command["gap"] < 2
    after = wait_led(production_dashboard, operator_token, "billing/cluster")
    assert after["leader"] == successor

    status, audit = call(
        production_dashboard, "GET", "/api/v1/audit?election=billing/cluster", operator_token
    )
    assert status == 200
    actions = {e["action"] for e in audit["entries"]}
    assert {"switchover-requested", "command-done"} <= actions


def test_refusals_through_the_api(
    production_dashboard: LiveDashboard, fleet: dict, operator_token: str, viewer_token: str
) -> None:
    wait_led(production_dashboard, operator_token, "search/shard-1")
    path = "/api/v1/elections/search/shard-1/step-down"
    status, data = call(production_dashboard, "POST", path, viewer_token, {"reason": "x"})
    assert status == 403 and "permission" in data["error"]
    status, data = call(
        production_dashboard,
        "POST",
        "/api/v1/elections/no/such/step-down",
        operator_token,
        {"reason": "x"},
    )
    assert status == 404
    status, data = call(production_dashboard, "POST", path, operator_token, {"reason": ""})
    assert status == 400
    status, data = call(production_dashboard, "POST", path, "wrong-token", {"reason": "x"})
    assert status == 401
    status, data = call(
        production_dashboard, "POST", path, operator_token, {"reason": "x", "successor": "nobody"}
    )
    assert status == 412 and "not a healthy candidate" in data["error"]
