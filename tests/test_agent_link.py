"""The agent's dashboard link against real websocket servers that misbehave."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from agent import protocol
from agent.config import load_config
from agent.link import DashboardLink
from agent.service import Agent
from agent.spool import AsyncSpool
from tests.helpers import eventually, free_port


class ScriptedDashboard:
    """A real websocket server in the dashboard's place. Each connection's answer to the hello
    comes from ``answers`` while any are left (garbage first); after that it behaves: acks the
    hello with what it has stored, sends ``mid_session`` frames, stores and acks events."""

    def __init__(self, answers: list[str], mid_session: list[str] | None = None) -> None:
        self.answers = list(answers)
        self.mid_session = mid_session or []
        self.connections = 0
        self.events: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []
        self.stored = 0
        self.url = ""

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionClosed):
            await self._session(ws)

    async def _session(self, ws: ServerConnection) -> None:
        await ws.recv()  # the hello
        if self.answers:
            await ws.send(self.answers.pop(0))
            async for _ in ws:  # until the agent hangs up
                pass
            return
        await ws.send(json.dumps({"type": "ack", "seq": self.stored}))
        for text in self.mid_session:
            await ws.send(text)
        async for text in ws:
            frame = json.loads(text)
            if frame["type"] == "events":
                self.events.extend(frame["items"])
                self.stored = max([self.stored, *(e["seq"] for e in frame["items"])])
                await ws.send(json.dumps({"type": "ack", "seq": self.stored}))
            elif frame["type"] == "result":
                self.results.append(frame)

    @contextlib.asynccontextmanager
    async def running(self, **kwargs: Any) -> AsyncIterator[ScriptedDashboard]:
        async with serve(self.handler, "127.0.0.1", 0, **kwargs) as server:
            port = server.sockets[0].getsockname()[1]
            scheme = "wss" if kwargs.get("ssl") else "ws"
            self.url = f"{scheme}://127.0.0.1:{port}/ws/agent/"
            yield self


def agent_config(tmp_path: Path, dashboard: str, extra: str = "") -> Path:
    (tmp_path / "token").write_text("not-checked-here")
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[agent]\nid = "link-1"\ndashboard = "{dashboard}"\ntoken_file = "token"\n'
        f'heartbeat = "200ms"\n{extra}\n'
        '[[election]]\nname = "link/one"\nbackend = "raft"\nttl = "1s"\n'
        f'listen = "127.0.0.1:{free_port()}"\nheartbeat = "50ms"\nelection_timeout = "200ms"\n'
    )
    return path


async def test_a_bad_answer_to_the_hello_is_logged_and_the_link_reconnects(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = [
        "this is not JSON",
        json.dumps({"type": "command", "kind": "reboot"}),  # an invalid command
        json.dumps({"type": "ack", "seq": -1}),
    ]
    mid_session = [
        "more garbage",
        json.dumps({"type": "command", "id": 1, "kind": "explode", "election": "link/one"}),
        "[1, 2]",
    ]
    async with ScriptedDashboard(garbage, mid_session).running() as dashboard:
        agent = Agent(load_config(agent_config(tmp_path, dashboard.url)))
        await agent.start()
        try:
            await eventually(lambda: agent.is_leader("link/one"), timeout=10)
            link = agent.link
            assert link is not None
            # Three refused sessions, then a good one that delivers the spooled events.
            await eventually(
                lambda: link.connected and dashboard.stored >= 2 and agent.spool.count() == 0,
                timeout=15,
            )
            assert dashboard.connections == len(garbage) + 1
            assert [e["seq"] for e in dashboard.events] == list(range(1, dashboard.stored + 1))
            assert agent._link_task is not None and not agent._link_task.done()
        finally:
            await agent.stop()
    bad = [r.getMessage() for r in caplog.records if "bad frame" in r.getMessage()]
    assert len(bad) == len(garbage) + len(mid_session), bad


async def test_an_unexpected_error_in_a_session_does_not_end_the_link(tmp_path: Path) -> None:
    spool = AsyncSpool(tmp_path / "link.spool")
    await spool.open()
    for state in ("candidate", "leader", "follower"):
        at = datetime.now(UTC).isoformat()
        await spool.append({"election": "x/y", "from": "follower", "to": state, "at": at})
    hellos = 0

    def hello() -> protocol.Hello:
        nonlocal hellos
        hellos += 1
        if hellos == 1:
            raise RuntimeError("the hello could not be built")
        return protocol.Hello(agent="link-2", last_seq=spool.last_seq)

    async def failing_command(command: protocol.Command) -> protocol.Result:
        raise ValueError("the election exploded")

    command = json.dumps({"type": "command", "id": 7, "kind": "step-down", "election": "x/y"})
    async with ScriptedDashboard([], [command]).running() as dashboard:
        link = DashboardLink(
            dashboard.url,
            "token",
            spool,
            hello=hello,
            heartbeat=lambda: protocol.Heartbeat(at=datetime.now(UTC)),
            on_command=failing_command,
        )
        task = asyncio.create_task(link.run())
        try:
            await eventually(lambda: spool.count() == 0 and dashboard.results, timeout=10)
            assert [e["seq"] for e in dashboard.events] == [1, 2, 3]
            assert hellos >= 2 and not task.done()
            (result,) = dashboard.results
            assert result["command"] == 7 and result["ok"] is False
            assert "the election exploded" in result["detail"]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await spool.close()


@pytest.fixture(autouse=True)
def _agent_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent")
