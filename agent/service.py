"""The agent process: runners for every configured election, the spool, the dashboard link
and the health server, wired together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import protocol
from agent import __version__
from agent.config import AgentConfig
from agent.health import HealthServer
from agent.metrics import AgentMetrics
from agent.runner import ElectionRunner, Transition
from agent.spool import AsyncSpool
from protocol import CommandKind

if TYPE_CHECKING:
    from agent.link import DashboardLink

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.spool = AsyncSpool(config.spool)
        self.runners: dict[str, ElectionRunner] = {
            e.name: ElectionRunner(
                e, config.id, hold_off=config.hold_off, on_transition=self._record
            )
            for e in config.elections
        }
        self.link: DashboardLink | None = None
        if config.dashboard and config.token:
            # Imported only with a dashboard: websockets (with the urllib and http.client its
            # proxy support loads) is about 1 MB that an agent without one does not need.
            from agent.link import DashboardLink

            self.link = DashboardLink(
                config.dashboard,
                config.token,
                self.spool,
                hello=self.hello,
                heartbeat=self.heartbeat,
                on_command=self.run_command,
                heartbeat_interval=config.heartbeat,
                ca_file=config.ca_file,
            )
        self.health: HealthServer | None = None
        if config.health:
            metrics = AgentMetrics(self.runners.values, self.spool.count)
            self.health = HealthServer(
                *config.health,
                status=self.status,
                is_leader=self.is_leader,
                metrics=metrics.render,
            )
        self._link_task: asyncio.Task[None] | None = None

    async def _record(self, transition: Transition) -> None:
        """Spool a transition. The runner awaits this, so the event is on disk when it returns;
        the loop stays free meanwhile (the write runs on the spool's own thread)."""
        try:
            await self.spool.append(transition.spooled())
        finally:
            # Also when the runner gave up waiting (a callback timeout): the link's next read
            # queues behind this write on the spool thread, so it finds the event.
            if self.link:
                self.link.notify()

    def is_leader(self, election: str) -> bool | None:
        runner = self.runners.get(election)
        return None if runner is None else runner.is_leader()

    def hello(self) -> protocol.Hello:
        return protocol.Hello(
            agent=self.config.id,
            hostname=socket.gethostname(),
            version=__version__,
            elections=[
                protocol.ElectionInfo(
                    name=r.name, backend=r.config.backend, labels=r.config.labels, ttl=r.config.ttl
                )
                for r in self.runners.values()
            ],
            last_seq=self.spool.last_seq,
        )

    def heartbeat(self) -> protocol.Heartbeat:
        return protocol.Heartbeat(
            at=datetime.now(UTC),
            states={
                r.name: protocol.ElectionState(
                    state=r.state, leader=r.leader, token=r.token, ttl_left=r.ttl_left()
                )
                for r in self.runners.values()
            },
        )

    def status(self) -> dict[str, Any]:
        return {
            "agent": self.config.id,
            "version": __version__,
            "dashboard": {
                "url": self.config.dashboard,
                "connected": bool(self.link and self.link.connected),
                "error": self.link.last_error if self.link else None,
            },
            "spool": {"pending": self.spool.count(), "last_seq": self.spool.last_seq},
            "elections": {
                r.name: {
                    "backend": r.config.backend,
                    "state": r.state,
                    "leader": r.leader,
                    "token": r.token,
                    "is_leader": r.is_leader(),
                    "ttl_left": r.ttl_left(),
                    "error": r.error,
                }
                for r in self.runners.values()
            },
        }

    async def run_command(self, command: protocol.Command) -> protocol.Result:
        runner = self.runners.get(command.election)
        if runner is None:
            return protocol.Result(
                command=command.id, ok=False, detail=f"no election {command.election!r} here"
            )
        if not runner.is_leader():
            if command.kind == CommandKind.SWITCHOVER and command.successor != self.config.id:
                # Not the leader, not the chosen one: stay out so the successor wins.
                runner.hold(command.hold_off)
                return protocol.Result(command=command.id, ok=True, detail="holding off")
            if command.kind == CommandKind.SWITCHOVER:
                return protocol.Result(command=command.id, ok=True, detail="ready to take over")
            return protocol.Result(
                command=command.id, ok=False, detail="this agent is not the leader"
            )
        result = await runner.step_down(hold_off=command.hold_off, successor=command.successor)
        return protocol.Result(
            command=command.id,
            ok=result.ok,
            detail=result.detail,
            token=result.token,
            leader=result.leader,
            gap=result.gap,
        )

    async def start(self) -> None:
        await self.spool.open()
        if self.health:
            await self.health.start()
            log.info("health endpoints on http://%s:%s/health", self.health.host, self.health.port)
        for runner in self.runners.values():
            await runner.start()
        if self.link:
            self._link_task = asyncio.create_task(self.link.run(), name="dashboard link")

    async def stop(self) -> None:
        """Resign every election, then give the link a moment to flush the last events."""
        await asyncio.gather(*(r.stop() for r in self.runners.values()))
        await self.spool.flush()  # a transition whose callback timed out is still being written
        if self.link and self.link.connected:
            await self.link.drained(timeout=2)
        if self._link_task:
            self._link_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._link_task
        if self.health:
            await self.health.stop()
        await self.spool.close()
