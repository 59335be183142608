"""The agent websocket (``/ws/agent/``): authenticate, validate each frame, call one action.

Protocol: ARCHITECTURE §4 and ``agent.protocol``. A token belongs to one agent id; frames
from that socket can only touch that agent's records.
"""

from __future__ import annotations

import logging
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from agent import protocol
from elections import actions, commands, tokens
from elections.broadcast import agent_group

log = logging.getLogger(__name__)


class AgentConsumer(AsyncWebsocketConsumer):
    agent_id: str | None = None
    greeted = False
    errors = 0

    async def connect(self) -> None:
        token = tokens.bearer(self.scope.get("headers", []))
        self.agent_id = await database_sync_to_async(actions.authenticate_agent)(token)
        if self.agent_id is None:
            await self.close(code=4401)  # before accept: the handshake is refused (HTTP 403)
            return
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.agent_id and self.greeted:
            await self.channel_layer.group_discard(agent_group(self.agent_id), self.channel_name)
            await database_sync_to_async(actions.agent_disconnected)(self.agent_id)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is None:
            await self._reject(protocol.ProtocolError("bad-frame", "frames must be JSON text"))
            return
        try:
            frame = protocol.parse_agent_frame(text_data)
        except protocol.ProtocolError as exc:
            await self._reject(exc)
            return
        if isinstance(frame, protocol.Hello):
            await self._hello(frame)
        elif not self.greeted:
            await self._reject(protocol.ProtocolError("hello-first", "send hello before anything"))
        elif isinstance(frame, protocol.Events):
            await self._events(frame)
        elif isinstance(frame, protocol.Heartbeat):
            await database_sync_to_async(actions.record_heartbeat)(self.agent_id, frame)
        elif isinstance(frame, protocol.Result):
            await database_sync_to_async(commands.record_result)(self.agent_id, frame)

    async def _hello(self, hello: protocol.Hello) -> None:
        if hello.agent != self.agent_id:
            await self._send(
                protocol.Error(
                    code="wrong-agent",
                    message=f"this token belongs to agent {self.agent_id!r}, not {hello.agent!r}",
                )
            )
            await self.close(code=protocol.CLOSE_WRONG_AGENT)
            return
        stored = await database_sync_to_async(actions.register_agent)(hello)
        if not self.greeted:
            await self.channel_layer.group_add(agent_group(hello.agent), self.channel_name)
        self.greeted = True
        await self._send(protocol.Ack(seq=stored))

    async def _events(self, frame: protocol.Events) -> None:
        result = await database_sync_to_async(actions.ingest_events)(self.agent_id, frame.items)
        for name in result.unknown_elections:
            await self._send(
                protocol.Error(
                    code="unknown-election",
                    message=f"election {name!r} was not in your hello; its events were kept",
                )
            )
        await self._send(protocol.Ack(seq=result.acked))

    async def _reject(self, exc: protocol.ProtocolError) -> None:
        self.errors += 1
        await self._send(protocol.Error(code=exc.code, message=exc.message))
        if self.errors >= protocol.MAX_ERRORS:
            await self.close(code=protocol.CLOSE_ABUSE)

    async def _send(self, frame: protocol.Frame) -> None:
        await self.send(text_data=protocol.dump(frame))

    async def agent_command(self, message: dict[str, Any]) -> None:
        """A command for this agent, from the command service via the channel layer."""
        await self.send(text_data=message["frame"])
