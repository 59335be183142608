"""The agent's websocket link to the dashboard: hello, events from the spool, heartbeats,
commands. Visibility never decides leadership: this link failing changes no election."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

import protocol
from agent.spool import AsyncSpool

log = logging.getLogger(__name__)

#: Back-off between connection attempts (seconds), doubled after each failure.
FIRST_RETRY = 0.2
MAX_RETRY = 10.0


class CannotVerify(Exception):
    """The CA file is gone or unreadable: no wss:// connection can be verified."""


#: How long the link waits after new events before sending, to batch a burst.
BATCH_WINDOW = 0.01


@dataclass(eq=False)
class DashboardLink:
    url: str
    token: str
    spool: AsyncSpool
    _: KW_ONLY
    hello: Callable[[], protocol.Hello]
    heartbeat: Callable[[], protocol.Heartbeat]
    on_command: Callable[[protocol.Command], Awaitable[protocol.Result]]
    heartbeat_interval: float = 3.0
    ca_file: Path | None = None
    connected: bool = field(default=False, init=False)
    last_error: str | None = field(default=None, init=False)
    acked: int = field(default=0, init=False)
    _wake: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _drained: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, init=False)

    def notify(self) -> None:
        """New events are in the spool."""
        self._wake.set()

    async def run(self) -> None:
        """Keep a session with the dashboard until cancelled: whatever ends one (the network,
        a refusal, a bad frame, a bug), log it and reconnect with back-off."""
        delay = FIRST_RETRY
        while True:
            unexpected = False
            try:
                async with connect(
                    self.url,
                    ssl=self._tls(),  # per attempt: a renewed (or lost) CA file is seen
                    additional_headers={"Authorization": f"Bearer {self.token}"},
                    max_size=protocol.MAX_FRAME_BYTES,
                    open_timeout=10,
                    ping_interval=10,
                    ping_timeout=10,
                ) as ws:
                    await self._session(ws)
            except asyncio.CancelledError:
                raise
            except InvalidStatus as exc:
                self.last_error = (
                    f"dashboard refused the connection: HTTP {exc.response.status_code}"
                )
                log.error("%s (check the agent token)", self.last_error)
                delay = max(delay, 5.0)
            except ssl.SSLCertVerificationError as exc:
                hint = (
                    f"is {self.ca_file} the CA that signed it? (agent.ca_file)"
                    if self.ca_file
                    else "set agent.ca_file to the CA that signed it"
                )
                self.last_error = (
                    f"the dashboard's TLS certificate is not trusted: {exc.verify_message}; {hint}"
                )
                log.error("%s", self.last_error)
                delay = max(delay, 5.0)
            except CannotVerify as exc:
                self.last_error = str(exc)
                log.error("%s", self.last_error)
                delay = max(delay, 5.0)
            except protocol.ProtocolError as exc:  # mid-session frames are handled in _receive
                self.last_error = f"dashboard answered the hello with a bad frame: {exc}"
                log.error("%s; reconnecting", self.last_error)
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                self.last_error = f"dashboard unreachable: {exc or type(exc).__name__}"
                log.warning("%s", self.last_error)
            except Exception as exc:
                unexpected = True
                self.last_error = f"dashboard link failed: {type(exc).__name__}: {exc}"
                log.exception("dashboard link failed; reconnecting")
            finally:
                # A session that worked until its connection ended retries soon; anything
                # else (refused, garbage, a bug) backs off, so a broken dashboard is not
                # hammered.
                if self.connected and not unexpected:
                    delay = FIRST_RETRY
                self.connected = False
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, MAX_RETRY)

    def _tls(self) -> ssl.SSLContext | None:
        """Certificates are always verified (hostname included): the token travels in the
        handshake, and a dashboard can order step-downs. No switch turns this off; for a
        self-signed dashboard, name its certificate (or its CA) in ca_file."""
        if not self.url.startswith("wss://"):
            return None
        try:
            return ssl.create_default_context(cafile=self.ca_file)
        except OSError as exc:  # checked at load; this is a file lost or broken since
            raise CannotVerify(f"cannot load agent.ca_file {self.ca_file}: {exc}") from None

    async def _session(self, ws: ClientConnection) -> None:
        await ws.send(protocol.dump(self.hello()))
        # The dashboard answers the hello with the highest seq it has stored.
        first = protocol.parse_dashboard_frame(await asyncio.wait_for(ws.recv(), timeout=10))
        if isinstance(first, protocol.Error):
            self.last_error = f"dashboard: {first.code}: {first.message}"
            log.error("%s", self.last_error)
            await asyncio.sleep(5)
            return
        if isinstance(first, protocol.Ack):
            await self._acked(first.seq)
        self.connected = True
        self.last_error = None
        log.info("connected to %s", self.url)
        # Sending and receiving end together: a session that can no longer send its events
        # and heartbeats must not linger, half alive, on a socket that still receives.
        tasks = {
            asyncio.create_task(self._send_loop(ws), name="dashboard send"),
            asyncio.create_task(self._receive_loop(ws), name="dashboard receive"),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()  # re-raise what ended the session, for run() to report

    async def _acked(self, seq: int) -> None:
        await self.spool.ack(seq)
        self.acked = seq
        if not self.spool.count():
            self._drained.set()

    async def drained(self, timeout: float) -> bool:
        """Wait until the dashboard has acked every spooled event."""
        if not self.spool.count():
            return True
        self._drained.clear()
        self.notify()
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _receive_loop(self, ws: ClientConnection) -> None:
        async for text in ws:
            await self._receive(ws, text)

    async def _receive(self, ws: ClientConnection, text: str | bytes) -> None:
        try:
            frame = protocol.parse_dashboard_frame(text)
        except protocol.ProtocolError as exc:
            # Logged and ignored rather than reconnecting: acks are cumulative, so the next
            # good one covers a lost one, and a command we cannot read expires on the
            # dashboard; dropping a working session would only churn (and repeat).
            log.warning("ignoring a bad frame from the dashboard: %s", exc)
            return
        if isinstance(frame, protocol.Ack):
            await self._acked(frame.seq)
        elif isinstance(frame, protocol.Error):
            log.warning("dashboard error %s: %s", frame.code, frame.message)
        elif isinstance(frame, protocol.Command):
            task = asyncio.create_task(self._run_command(ws, frame))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_command(self, ws: ClientConnection, command: protocol.Command) -> None:
        try:
            result = await self.on_command(command)
        except Exception as exc:
            # The operator waiting on the dashboard gets an answer, not a command that expires.
            log.exception("command %s (%s) failed", command.id, command.kind)
            detail = f"the agent failed to run it: {type(exc).__name__}: {exc}"
            result = protocol.Result(command=command.id, ok=False, detail=detail[:500])
        with contextlib.suppress(websockets.WebSocketException):
            await ws.send(protocol.dump(result))

    async def _send_loop(self, ws: ClientConnection) -> None:
        sent = self.acked
        next_beat = 0.0
        loop = asyncio.get_running_loop()
        while True:
            batch = await self.spool.pending(
                after=max(sent, self.acked), limit=protocol.MAX_EVENTS_PER_FRAME
            )
            if batch:
                items = [protocol.spooled_event(event) for event in batch]
                # Keep the frame under the size limit: halve the batch until it fits.
                while True:
                    text = protocol.dump(protocol.Events(items=items[: len(batch)]))
                    if len(text) <= protocol.MAX_FRAME_BYTES or len(batch) == 1:
                        break
                    batch = batch[: len(batch) // 2]
                await ws.send(text)
                sent = batch[-1]["seq"]
                continue
            now = loop.time()
            if now >= next_beat:
                await ws.send(protocol.dump(self.heartbeat()))
                next_beat = now + self.heartbeat_interval
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, next_beat - loop.time()))
            if self._wake.is_set():
                # Transitions come in bursts (a campaign, a win, another election's loss):
                # a few milliseconds more and they share one frame instead of one each.
                await asyncio.sleep(BATCH_WINDOW)
