"""Step-down to new leader in the API, per backend: three real agent processes report to the
dashboard; a step-down is requested through the API and the API is polled until it names
another leader with a newer token."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.fleet import median
from bench.server import Dashboard
from tests.backends.conformance import AgentProcess, Target, toml_dumps
from tests.helpers import free_port
from tests.live import api


@dataclass
class StepdownFigures:
    backend: str
    times: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        return median(self.times)


async def _settled(dashboard: Dashboard, token: str, name: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    data: dict = {}
    while time.monotonic() < deadline:
        data = await asyncio.to_thread(api, dashboard, token, "GET", f"/api/v1/elections/{name}")
        members = data.get("members", [])
        if (
            data.get("status") == "led"
            and data.get("leader_connected")
            and len(members) == 3
            and all(m["connected"] for m in members)
            and sum(m["state"] == "follower" for m in members) == 2
        ):
            return data
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} never settled: {data}")


async def run(
    dashboard: Dashboard, t: Target, workdir: Path, api_token: str, *, runs: int = 5
) -> StepdownFigures:
    figures = StepdownFigures(t.name)
    election = t.election_name()
    ids = [f"{election}-a{i}" for i in range(3)]
    tokens = dashboard.agent_tokens(ids)
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    agents = []
    for i, agent_id in enumerate(ids):
        (workdir / f"{agent_id}.token").write_text(tokens[agent_id])
        port = free_port()
        raw = t.raw_config(
            agent_id,
            election,
            i,
            3,
            health=f"127.0.0.1:{port}",
            dashboard=dashboard.ws_agent,
            token_file=f"{agent_id}.token",
            heartbeat="1s",
            hold_off="2s",
        )
        path = workdir / f"{agent_id}.toml"
        path.write_text(toml_dumps(raw))
        agents.append(AgentProcess(agent_id, election, path, port))
    for agent in agents:
        agent.start()
    try:
        for _ in range(runs):
            try:
                before = await _settled(dashboard, api_token, election, 30)
                started = time.monotonic()
                answer = await asyncio.to_thread(
                    api,
                    dashboard,
                    api_token,
                    "POST",
                    f"/api/v1/elections/{election}/step-down",
                    {"reason": "bench", "wait": 0},
                )
                if "command" not in answer:
                    raise AssertionError(f"refused: {answer}")
                while True:
                    data = await asyncio.to_thread(
                        api, dashboard, api_token, "GET", f"/api/v1/elections/{election}"
                    )
                    if (
                        data.get("leader")
                        and data["leader"] != before["leader"]
                        and (data.get("token") or 0) > (before["token"] or 0)
                    ):
                        figures.times.append(time.monotonic() - started)
                        break
                    if time.monotonic() - started > 15:
                        raise AssertionError(f"no new leader in the API within 15 s: {data}")
                    await asyncio.sleep(0.01)
                await asyncio.sleep(2.5)  # the old leader's hold-off
            except AssertionError as exc:
                figures.failures.append(str(exc))
    finally:
        for agent in agents:
            if agent.alive:
                agent.send(15)
        for agent in agents:
            await agent.wait(15)
        await t.cleanup(election)
    return figures
