"""The election runner: one election, one backend, the states and callbacks around it.

The runner is the same for every mechanism. It campaigns, renews and resigns through the
backend, and it fences itself: leadership is a lease with a monotonic deadline, every backend
call is bounded by what is left of it, and ``is_leader()`` turns false the moment the lease
runs out even if the loop is stuck. Callbacks fire on transitions only, in order.

Library use::

    runner = ElectionRunner(election_config, "web-1", on_won=..., on_lost=...)
    await runner.start()
    ...
    if runner.is_leader(): ...
    await runner.stop()   # resigns when leading
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import protocol
from agent.backends.base import Backend, Lease, Seat
from agent.backends.errors import Lost, Misconfigured, Unavailable
from agent.backends.registry import backend_class
from agent.config import ElectionConfig
from protocol import CommandKind, EndReason, State

log = logging.getLogger(__name__)

Callback = Callable[..., Awaitable[None] | None]

#: The runner demotes this long before the lease deadline, to absorb scheduling delays.
SAFETY_MARGIN = 0.1
#: A callback that takes longer than this is abandoned (goelect's per-state timeout).
CALLBACK_TIMEOUT = 5.0
#: How soon a leader retries after a failed renewal.
RENEW_RETRY = 0.2


def _revoked_why(lease: Lease) -> str:
    reason = lease.revocation.reason if lease.revocation else None
    return reason or "the backend revoked the lease"


#: What ``on_transition`` callbacks receive: the protocol's change, built here directly.
Transition = protocol.Change


@dataclass
class StepDownResult:
    ok: bool
    detail: str
    token: int | None = None
    leader: str | None = None
    #: Seconds from giving up the seat to seeing the new leader.
    gap: float | None = None


@dataclass
class _Request:
    kind: str
    hold_off: float
    successor: str | None
    forced: bool
    future: asyncio.Future[StepDownResult] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class ElectionRunner:
    def __init__(
        self,
        config: ElectionConfig,
        agent_id: str,
        *,
        backend: Backend | None = None,
        hold_off: float = 2.0,
        on_won: Callback | None = None,
        on_lost: Callback | None = None,
        on_campaign: Callback | None = None,
        on_transition: Callback | None = None,
        flap_limit: int = 3,
        flap_window: float = 300.0,
        splay: float = 0.0,
    ) -> None:
        self.config = config
        self.agent_id = agent_id
        self.backend = backend or backend_class(config.backend)(
            election=config.name, agent_id=agent_id, ttl=config.ttl, options=config.options
        )
        self.hold_off = hold_off
        self.on_won = on_won
        self.on_lost = on_lost
        self.on_campaign = on_campaign
        self.on_transition = on_transition
        self.flap_limit = flap_limit
        self.flap_window = flap_window
        self.splay = splay

        self.state = self._idle_state()
        self.leader: str | None = None
        self.token: int | None = None
        self.error: str | None = None
        self.leader_changes = 0
        self._lease: Lease | None = None
        self._renew_failing = False
        self._hold_off_until = 0.0
        self._wins: deque[float] = deque()
        self._requests: asyncio.Queue[_Request] = asyncio.Queue()
        self._stopping = asyncio.Event()
        #: Set on a step-down request or stop, to cut a follower's wait short.
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    # -- public API -------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.config.name

    def is_leader(self) -> bool:
        """True only while this agent holds a lease it can prove."""
        lease = self._lease
        return (
            lease is not None
            and not lease.revoked
            and time.monotonic() < lease.expires - SAFETY_MARGIN
        )

    def ttl_left(self) -> float | None:
        lease = self._lease
        if lease is None:
            return None
        if lease.revoked:
            return 0.0
        return max(0.0, lease.expires - time.monotonic())

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"election {self.name}")

    async def stop(self, *, resign: bool = True) -> None:
        """Stop campaigning; resign first when leading (a SIGTERM'd agent must not linger)."""
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=self.config.ttl + 5)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            except Exception:  # the loop already logged it
                pass
        if self._lease is not None:
            lease, self._lease = self._lease, None
            if resign:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.backend.resign(lease), timeout=2)
            await self._become(
                self._idle_state(), None, None, reason=EndReason.RESIGNED, detail="agent stopping"
            )
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.backend.close(), timeout=5)

    async def step_down(
        self, *, hold_off: float | None = None, successor: str | None = None, forced: bool = True
    ) -> StepDownResult:
        """Resign (or hand over to ``successor``) and stay out of the race for ``hold_off``."""
        request = _Request(
            kind=CommandKind.STEP_DOWN,
            hold_off=self.hold_off if hold_off is None else hold_off,
            successor=successor,
            forced=forced,
        )
        await self._requests.put(request)
        self._wake.set()
        return await request.future

    def hold(self, seconds: float) -> None:
        """Stay out of the race for ``seconds`` (so that a chosen successor wins)."""
        self._hold_off_until = max(self._hold_off_until, time.monotonic() + seconds)
        self.backend.hold()
        self._changed.set()

    async def wait_for(self, predicate: Callable[[ElectionRunner], bool], timeout: float) -> bool:
        """Wait until ``predicate(self)`` holds; for tests and the step-down confirmation."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(left, 0.05))
        return True

    # -- the loop ---------------------------------------------------------------------------

    def _idle_state(self) -> str:
        if self.config.observer:
            return State.OBSERVER
        if getattr(self.config.options, "no_vote", False):
            return State.NO_VOTE
        return State.FOLLOWER

    async def _run(self) -> None:
        try:
            await self._open()
            if self.splay:
                await self._sleep(random.uniform(0, self.splay))
            while not self._stopping.is_set():
                if self._lease is None:
                    await self._follow()
                else:
                    await self._lead()
        except Misconfigured as exc:
            self.error = str(exc)
            log.error("election %s stopped: %s", self.name, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("election %s crashed", self.name)
            self.error = "crashed; see the agent log"

    async def _open(self) -> None:
        delay = 0.2
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self.backend.open(), timeout=max(self.config.ttl, 5))
                self.error = None
                return
            except (Unavailable, TimeoutError, OSError) as exc:
                self.error = f"backend unavailable: {exc or type(exc).__name__}"
                log.warning("election %s: %s; retrying in %.1fs", self.name, self.error, delay)
                await self._sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _follow(self) -> None:
        while not self._requests.empty():
            request = self._requests.get_nowait()
            request.future.set_result(StepDownResult(False, "this agent is not the leader"))
        idle = self._idle_state()
        now = time.monotonic()
        waiting = idle != State.FOLLOWER or now < self._hold_off_until
        if not waiting and self._flapping(now):
            self.hold(self.config.ttl)
            waiting = True
        timeout = self.backend.retry_interval
        if not waiting:
            lease = await self._call(self.backend.campaign(), self.config.ttl)
            # A lease already inside the safety margin proves nothing: announcing it would
            # fire won and lost back to back (a Raft leader that lost quorum did so ~100x).
            fresh = isinstance(lease, Lease) and not lease.revoked
            if fresh and lease.expires - SAFETY_MARGIN > time.monotonic():
                await self._won(lease)
                return
        seat = await self._call(self.backend.observe(), self.config.ttl)
        if isinstance(seat, Seat):
            self.error = None
            if seat.leader == self.agent_id:
                # Our own stale seat (from before a restart): not a lease we can prove.
                seat = Seat(None, seat.token)
            if idle != State.FOLLOWER:
                await self._become(idle, seat.leader, seat.token)
            elif seat.leader is None and not waiting:
                await self._become(State.CANDIDATE, None, seat.token)
            else:
                await self._become(State.FOLLOWER, seat.leader, seat.token)
        if waiting:
            left = self._hold_off_until - time.monotonic()
            if left > 0:
                timeout = min(timeout, left)
        await self._wait_change(timeout)

    async def _lead(self) -> None:
        lease = self._lease
        assert lease is not None
        deadline = lease.expires - SAFETY_MARGIN
        # After a failed renewal, retry soon rather than a whole interval later: one timed-out
        # request must not cost a healthy leader its lease.
        interval = RENEW_RETRY if self._renew_failing else self.backend.renew_interval
        wake = min(time.monotonic() + interval, deadline)
        request = await self._next_request(wake - time.monotonic(), lease)
        if lease.revoked:
            if request is not None:
                self._requests.put_nowait(request)  # answered as a follower
            await self._demote(EndReason.LOST, _revoked_why(lease))
            return
        if request is not None:
            await self._handle_request(request, lease)
            return
        if self._stopping.is_set():
            return
        left = deadline - time.monotonic()
        if left <= 0:
            await self._demote(EndReason.EXPIRED, "could not renew the lease before it ran out")
            return
        try:
            new = await asyncio.wait_for(self.backend.renew(lease), timeout=left)
        except Lost as exc:
            await self._demote(
                EndReason.LOST, str(exc) or "the backend says another holds the seat"
            )
            return
        except (Unavailable, TimeoutError, OSError) as exc:
            self.error = f"renew failed: {exc or type(exc).__name__}"
            self._renew_failing = True
            if time.monotonic() >= deadline:
                await self._demote(EndReason.EXPIRED, self.error)
            return
        self.error = None
        self._renew_failing = False
        self._lease = new
        self.token = new.token
        self._changed.set()
        if new.revoked:  # revoked while the renewal was on its way
            await self._demote(EndReason.LOST, _revoked_why(new))

    async def _handle_request(self, request: _Request, lease: Lease) -> None:
        reason = EndReason.FORCED if request.forced else EndReason.RESIGNED
        detail = f"step-down{' to ' + request.successor if request.successor else ''}"
        self.hold(request.hold_off)
        # Stop claiming the seat (and let on_lost run) before giving it up: once the release
        # lands another agent may win at once, and this one must already have stood down.
        await self._demote(reason, detail)
        problem = ""
        try:
            left = max(0.5, lease.expires - time.monotonic())
            transferred = await asyncio.wait_for(
                self.backend.transfer(lease, request.successor), timeout=left
            )
            if not transferred:
                left = max(0.5, lease.expires - time.monotonic())
                await asyncio.wait_for(self.backend.resign(lease), timeout=left)
        except Exception as exc:  # the seat lapses with the lease anyway
            log.warning("election %s: resign failed: %s", self.name, exc)
            problem = f" (resign failed: {exc}; the seat frees when the lease lapses)"
        result = await self._confirm_successor(lease.token, request)
        result.detail += problem
        request.future.set_result(result)

    async def _confirm_successor(self, old_token: int, request: _Request) -> StepDownResult:
        """Done means another agent holds the seat with a newer fencing token."""
        wait = max(request.hold_off, 1.0) + self.config.ttl
        resigned = time.monotonic()
        deadline = resigned + wait
        while time.monotonic() < deadline:
            seat = await self._call(self.backend.observe(), 2.0)
            if (
                isinstance(seat, Seat)
                and seat.leader
                and seat.leader != self.agent_id
                and (seat.token is None or seat.token > old_token)
            ):
                gap = time.monotonic() - resigned
                if request.successor and seat.leader != request.successor:
                    detail = f"{seat.leader} took over, not {request.successor}"
                    return StepDownResult(False, detail, seat.token, seat.leader, gap)
                detail = f"{seat.leader} leads now"
                return StepDownResult(True, detail, seat.token, seat.leader, gap)
            await self._wait_change(0.05)
        return StepDownResult(False, "resigned, but no new leader was seen in time")

    # -- helpers ----------------------------------------------------------------------------

    async def _call(self, coro: Awaitable[Any], timeout: float) -> Any:
        try:
            return await asyncio.wait_for(coro, timeout=timeout)
        except (Unavailable, TimeoutError, OSError) as exc:
            self.error = f"backend unavailable: {exc or type(exc).__name__}"
            return None

    async def _next_request(self, timeout: float, lease: Lease) -> _Request | None:
        """Wait up to ``timeout`` for a step-down request, stop or the lease's revocation;
        return the request if any."""
        if timeout > 0 and not lease.revoked:
            getter = asyncio.ensure_future(self._requests.get())
            waiters = {getter, asyncio.ensure_future(self._stopping.wait())}
            if lease.revocation is not None:
                waiters.add(asyncio.ensure_future(lease.revocation.wait()))
            done, pending = await asyncio.wait(
                waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            for task in pending:
                task.cancel()
            if getter in done:
                return getter.result()
            return None
        if not self._requests.empty():
            return self._requests.get_nowait()
        return None

    async def _wait_change(self, timeout: float) -> None:
        waiter = asyncio.ensure_future(self.backend.wait_for_change(timeout))
        self._wake.clear()
        if not self._requests.empty() or self._stopping.is_set():
            self._wake.set()
        woken = asyncio.ensure_future(self._wake.wait())
        _, pending = await asyncio.wait(
            {waiter, woken}, timeout=timeout + 1, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    def _flapping(self, now: float) -> bool:
        while self._wins and now - self._wins[0] > self.flap_window:
            self._wins.popleft()
        return (
            self.flap_limit > 0
            and len(self._wins) >= self.flap_limit
            and now - self._wins[-1] < self.config.ttl
        )

    async def _won(self, lease: Lease) -> None:
        self._lease = lease
        self._wins.append(time.monotonic())
        self.leader_changes += 1
        await self._become(State.LEADER, self.agent_id, lease.token, detail="won the election")

    async def _demote(self, reason: str, detail: str) -> None:
        self._lease = None
        await self._become(self._idle_state(), None, self.token, reason=reason, detail=detail)

    async def _become(
        self,
        state: str,
        leader: str | None,
        token: int | None,
        *,
        reason: str | None = None,
        detail: str = "",
    ) -> None:
        previous = self.state
        self.leader, self.token = leader, token if token is not None else self.token
        self._changed.set()
        if state == previous:
            return
        self.state = state
        log.info(
            "election %s: %s -> %s (leader %s, token %s) %s",
            self.name,
            previous,
            state,
            leader,
            token,
            detail,
        )
        if state == State.LEADER:
            await self._fire(self.on_won, self.name, token)
        elif previous == State.LEADER:
            await self._fire(self.on_lost, self.name, reason)
        if state == State.CANDIDATE:
            await self._fire(self.on_campaign, self.name)
        # Not validated here: a backend's long error text must not stop a transition. The
        # link checks (and repairs) every event before it goes on the wire.
        transition = Transition.model_construct(
            election=self.name,
            from_=previous,
            to=state,
            token=self.token,
            leader=leader,
            at=datetime.now(UTC),
            detail=detail[:500],
            reason=reason if previous == State.LEADER else None,
        )
        await self._fire(self.on_transition, transition)

    async def _fire(self, callback: Callback | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            result = callback(*args)
            if inspect.isawaitable(result):
                await asyncio.wait_for(result, timeout=CALLBACK_TIMEOUT)
        except Exception:
            log.exception("election %s: callback %r failed", self.name, callback)
