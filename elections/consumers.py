"""The agent websocket (``/ws/agent/``): authenticate, validate each frame, call one action.

Protocol: ``protocol``. A token belongs to one agent id; frames from that socket can
only touch that agent's records. Database work runs on the shared pool (``elections.db``),
events frames go through the process's group commit (``elections.ingest_queue``), and
heartbeats that change nothing are only noted for the next liveness flush.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from channels.exceptions import StopConsumer
from django.conf import settings
from django.utils import timezone

import protocol
from elections import actions, clock, commands, heartbeats, tokens
from elections.broadcast import agent_group
from elections.db import run_db
from elections.ingest import Frame
from elections.ingest_queue import IngestFailed, ingest_queue
from elections.liveness import liveness
from elections.ratelimit import TokenBucket
from elections.revocations import revocations
from elections.websocket import CLOSE_TRY_AGAIN, BaseConsumer

log = logging.getLogger(__name__)


class AgentConsumer(BaseConsumer):
    agent_id: str | None = None
    session = ""
    greeted = False
    errors = 0
    #: This agent's clock skew, smoothed over this socket's heartbeats (``elections.clock``).
    skew: float | None = None

    async def connect(self) -> None:
        self.members: dict[str, heartbeats.Member] = {}
        self.frames = TokenBucket(
            settings.ELECTORATE_AGENT_FRAME_RATE, settings.ELECTORATE_AGENT_FRAME_BURST
        )
        token = tokens.bearer(self.scope.get("headers", []))
        self.agent_id = await run_db(actions.authenticate_agent, token)
        if self.agent_id is None:
            await self.close(code=4401)  # before accept: the handshake is refused (HTTP 403)
            return
        assert token is not None
        self.token_digest = tokens.digest(token)
        revocations().watch(self.token_digest, self)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.agent_id:
            revocations().forget(self.token_digest, self)
        if self.agent_id and self.greeted:
            liveness().forget(self.agent_id, [m.id for m in self.members.values()])
            await run_db(actions.agent_disconnected, self.agent_id, self.session)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if not self.frames.take():
            # A flood must not slow the other agents: this one reconnects with back-off and
            # resends from its spool what was not acked.
            await self._send(
                protocol.Error(
                    code="rate-limited",
                    message=f"more than {settings.ELECTORATE_AGENT_FRAME_RATE:.0f} frames a "
                    "second; closing (resend after reconnecting)",
                )
            )
            await self.close(code=protocol.CLOSE_RATE_LIMITED)
            raise StopConsumer
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
            await self._heartbeat(frame)
        elif isinstance(frame, protocol.Result):
            await run_db(commands.record_result, self.agent_id, frame)

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
        self.session = self.session or secrets.token_hex(16)
        try:
            registered = await run_db(actions.register_agent, hello, self.session)
        except actions.TooManyElections as exc:
            await self._reject(protocol.ProtocolError("too-many-elections", str(exc)))
            return
        self.members = registered.members
        if not self.greeted:  # commands for this agent (joined later if Redis is away)
            await self.join(agent_group(hello.agent))
        self.greeted = True
        await self._send(protocol.Ack(seq=registered.last_seq))

    async def _events(self, frame: protocol.Events) -> None:
        assert self.agent_id is not None
        try:
            result = await ingest_queue().submit(Frame(self.agent_id, frame.items))
        except IngestFailed as exc:
            # Nothing is lost: unacked events stay in the agent's spool and are sent again
            # when it reconnects.
            await self._send(protocol.Error(code="unavailable", message=str(exc)))
            await self.close(code=CLOSE_TRY_AGAIN)
            return
        for name in {e.election for e in frame.items}:
            if name in self.members:  # its state may have moved: the next heartbeat writes it
                self.members[name].view = None
        if result.refused:
            await self._send(
                protocol.Error(
                    code="not-a-member",
                    message="events refused: this agent is not a member of "
                    + ", ".join(repr(n) for n in result.refused[:10])
                    + " (announce an election in the hello before reporting it)",
                )
            )
        await self._send(protocol.Ack(seq=result.acked))

    async def _heartbeat(self, frame: protocol.Heartbeat) -> None:
        assert self.agent_id is not None
        now = timezone.now()
        changed, renewed = heartbeats.rows(self.members, frame, now)
        before, self.skew = self.skew, clock.smooth(self.skew, clock.sample(frame.at, now))
        buffer = liveness()
        # Crossing the skew threshold redraws the agent's elections (the flush announces it).
        flipped = clock.skewed(before) != clock.skewed(self.skew)
        buffer.seen(self.agent_id, self.session, now, self.skew, flipped)
        for row in renewed:
            buffer.lease(row.member_id, row.election_id, row.lease_expires, row.claims)
        if changed:
            await run_db(heartbeats.write_views, self.agent_id, changed)
            by_id = {m.id: m for m in self.members.values()}
            for row in changed:
                by_id[row.member_id].view = row.view
                by_id[row.member_id].late = row.late

    async def _reject(self, exc: protocol.ProtocolError) -> None:
        self.errors += 1
        await self._send(protocol.Error(code=exc.code, message=exc.message))
        if self.errors >= protocol.MAX_ERRORS:
            await self.close(code=protocol.CLOSE_ABUSE)

    async def _send(self, frame: protocol.Frame) -> None:
        await self.send(text_data=protocol.dump(frame))

    async def revoked(self) -> None:
        """Its token was revoked: it is disconnected at once (and refused from now on)."""
        await self._send(protocol.Error(code="token-revoked", message="this token was revoked"))
        await self.close(code=protocol.CLOSE_WRONG_AGENT)

    async def agent_command(self, message: dict[str, Any]) -> None:
        """A command for this agent, from the command service via the channel layer."""
        await self.send(text_data=message["frame"])
