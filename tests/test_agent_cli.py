"""The agent process: config errors, health endpoints, the spool while the dashboard is away."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config
from agent.metrics import Gauge
from agent.service import Agent
from agent.spool import Spool
from tests.helpers import eventually, free_port
from tests.live import LiveDashboard

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
[agent]
id = "solo-1"
health = "127.0.0.1:{health}"
spool = "solo.spool"

[[election]]
name = "solo/one"
backend = "raft"
ttl = "1s"
listen = "127.0.0.1:{raft}"
heartbeat = "50ms"
election_timeout = "200ms"
secret = "agent-cli-test-secret"
"""


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    ("text", "field", "problem"),
    [
        ("[agent\nid=1", "", "not valid TOML"),
        (
            '[agent]\nid = "x"\nbogus = 1\n'
            '[[election]]\nname="a"\nbackend="raft"\nlisten="127.0.0.1:1"',
            "agent.bogus",
            "unknown option",
        ),
        (
            '[[election]]\nname="a"\nbackend="paxos"',
            "election[0] (a).backend",
            "unknown backend 'paxos'",
        ),
        (
            '[[election]]\nname="a"\nbackend="raft"\nttl="ten"\nlisten="127.0.0.1:1"',
            "election[0].ttl",
            "duration",
        ),
        (
            '[[election]]\nname="a"\nbackend="raft"',
            "election[0] (a).listen",
            "required option is missing",
        ),
        (
            '[agent]\ndashboard="http://x/"\n[[election]]\nname="a"\nbackend="raft"\nlisten="127.0.0.1:1"',
            "agent.dashboard",
            "ws://",
        ),
        ("[agent]\n", "election", "no [[election]]"),
    ],
)
def test_a_bad_config_names_the_file_the_field_and_the_problem(
    tmp_path: Path, text: str, field: str, problem: str
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.path, info.value.field) == (str(path), field)
    assert problem in info.value.message
    done = run_cli("run", "--config", str(path))
    assert done.returncode == 2
    assert str(path) in done.stderr and problem in done.stderr


def test_a_missing_config_file_is_exit_code_2(tmp_path: Path) -> None:
    done = run_cli("run", "--config", str(tmp_path / "nope.toml"))
    assert done.returncode == 2
    assert "file not found" in done.stderr


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_health_endpoints_of_a_running_agent_process(tmp_path: Path) -> None:
    health = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(GOOD.format(health=health, raft=free_port()))
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(config)], cwd=ROOT
    )
    try:
        base = f"http://127.0.0.1:{health}"

        def leading() -> bool:
            try:
                return get(base + "/health/leadership/solo/one")[0] == 200
            except OSError:
                return False

        asyncio.run(eventually(leading, timeout=10))
        status, body = get(base + "/health")
        data = json.loads(body)
        assert status == 200
        assert data["elections"]["solo/one"]["state"] == "leader"
        assert data["elections"]["solo/one"]["is_leader"] is True
        assert get(base + "/health/leadership/nope")[0] == 404
        status, metrics = get(base + "/metrics")
        assert 'electorate_agent_is_leader{backend="raft",election="solo/one"} 1.0' in metrics
        # SIGTERM: the agent resigns on the way out and exits cleanly.
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_spool_keeps_seq_gap_free_across_restarts(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.spool")
    assert [spool.append({"n": i}) for i in range(3)] == [1, 2, 3]
    spool.ack(2)
    spool.close()
    spool = Spool(tmp_path / "s.spool")
    assert [e["seq"] for e in spool.pending()] == [3]
    assert spool.append({"n": 3}) == 4


def test_a_reset_spool_is_renumbered_after_what_the_dashboard_has(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "new.spool")
    spool.append({"n": 0})
    spool.append({"n": 1})
    spool.ack(40)  # the dashboard already stored seq 1..40 from this agent's old spool
    assert [e["seq"] for e in spool.pending()] == [41, 42]
    assert spool.append({"n": 2}) == 43


async def test_events_wait_in_the_spool_while_the_dashboard_is_away(
    tmp_path: Path, embedded_dashboard: LiveDashboard
) -> None:
    config_path = tmp_path / "agent.toml"
    dead = free_port()  # nothing listens here: the dashboard is "away"
    config_path.write_text(
        GOOD.format(health=free_port(), raft=free_port()).replace(
            "[agent]\n",
            f'[agent]\ndashboard = "ws://127.0.0.1:{dead}/ws/agent/"\nheartbeat = "200ms"\n',
        )
    )
    (tmp_path / "token").write_text(embedded_dashboard.token("solo-1"))
    import os

    os.environ["ELECTORATE_AGENT_TOKEN"] = (tmp_path / "token").read_text()
    try:
        agent = Agent(load_config(config_path))
    finally:
        del os.environ["ELECTORATE_AGENT_TOKEN"]
    await agent.start()
    try:
        await eventually(lambda: agent.is_leader("solo/one"), timeout=5)
        runner = agent.runners["solo/one"]
        for _ in range(3):
            await runner.step_down(hold_off=0)
            await eventually(lambda: agent.is_leader("solo/one"), timeout=5)
        # candidate, leader, then 3 x (follower, leader); the last "won" may still be on its
        # way to disk, as the spool writes off the loop after the lease is already held.
        await eventually(lambda: agent.spool.count() >= 7, timeout=5)
        pending = agent.spool.count()
        assert agent.link and not agent.link.connected

        agent.link.url = embedded_dashboard.ws_agent  # the dashboard is back
        await eventually(lambda: agent.spool.count() == 0, timeout=15)
        assert agent.link.acked == agent.spool.last_seq
    finally:
        await agent.stop()
    out = embedded_dashboard.shell(
        "from elections.models import Transition, Term; "
        "print(Transition.objects.filter(agent_id='solo-1').count(), "
        "Term.objects.filter(election__name='solo/one').count())",
    )
    transitions, terms = map(int, out.split())
    assert transitions >= pending and terms == 4


def health_config(tmp_path: Path, health: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[agent]\nid = "h-1"\nhealth = {health}\n[[election]]\nname = "h/one"\n'
        f'backend = "raft"\nlisten = "127.0.0.1:{free_port()}"\nsecret = "health-test-secret"\n'
    )
    return path


@pytest.mark.parametrize(
    ("health", "address"),
    [
        ('"{port}"', "127.0.0.1"),  # a port alone is loopback only
        ('":{port}"', "127.0.0.1"),
        ("{port}", "127.0.0.1"),  # a TOML integer, too
        ('"0.0.0.0:{port}"', "0.0.0.0"),  # exposing it is written out
        ('"127.0.0.1:{port}"', "127.0.0.1"),
        ('"[::1]:{port}"', "::1"),
    ],
)
async def test_the_health_server_binds_loopback_unless_a_host_is_given(
    tmp_path: Path, health: str, address: str
) -> None:
    port = free_port()
    config = load_config(health_config(tmp_path, health.format(port=port)))
    assert config.health == (address, port)
    agent = Agent(config)
    await agent.start()
    try:
        assert agent.health is not None and agent.health._server is not None
        bound = {s.getsockname()[:2] for s in agent.health._server.sockets}
        assert bound == {(address, port)}
    finally:
        await agent.stop()


@pytest.mark.parametrize("health", ['"nine"', '"70000"', "true", '"host:"', "-1"])
def test_a_bad_health_address_is_refused(tmp_path: Path, health: str) -> None:
    path = health_config(tmp_path, health)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == "agent.health"


async def test_metrics_are_valid_prometheus_text(tmp_path: Path) -> None:
    """The agent writes the exposition format itself; Prometheus' own parser must read it."""
    from prometheus_client.parser import text_string_to_metric_families

    agent = Agent(load_config(health_config(tmp_path, f'"{free_port()}"')))
    await agent.start()
    try:
        await eventually(lambda: agent.is_leader("h/one"), timeout=10)
        assert agent.health is not None
        families = {
            f.name: f for f in text_string_to_metric_families(agent.health.metrics().decode())
        }
    finally:
        await agent.stop()
    assert set(families) == {
        "electorate_agent_is_leader",
        "electorate_agent_fencing_token",
        "electorate_agent_leaderships_total",
        "electorate_agent_spool_events",
    }
    (leading,) = families["electorate_agent_is_leader"].samples
    assert leading.labels == {"election": "h/one", "backend": "raft"} and leading.value == 1.0
    assert families["electorate_agent_leaderships_total"].samples[0].value == 1.0

    gauge = Gauge("odd_labels", "labels that need escaping")
    gauge.add(2, name='a "quoted"\\back\nslash')
    (family,) = text_string_to_metric_families("\n".join(gauge.lines()) + "\n")
    assert family.samples[0].labels == {"name": 'a "quoted"\\back\nslash'}
