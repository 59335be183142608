"""The one small interface every election backend implements.

A backend knows its mechanism (a lock, a lease, a key, a vote) and nothing else: the runner
(``agent.runner``) owns states, callbacks, timeouts, hold-off and self-fencing. Each method is
one attempt; the runner decides when to call it again and bounds every call with a timeout.

Leadership is a ``Lease``: a fencing token and a ``time.monotonic()`` deadline up to which the
backend can *prove* this agent holds the seat. Compute the deadline from the moment the
request that proved it was *sent* (PD's rule), never from when the answer arrived, so that the
agent demotes itself before the server can hand the seat to someone else.

A backend that can learn *between* renewals that the seat is gone (an etcd watch on its own
key) gives its leases a ``Revocation`` and calls ``revoke()`` on it: ``is_leader()`` turns false
at that instant, and the runner demotes without waiting for the next renewal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict

log = logging.getLogger(__name__)


class Revocation:
    """A one-shot signal from a backend: the seat a lease proves is gone, and why."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._event = asyncio.Event()

    @property
    def revoked(self) -> bool:
        return self.reason is not None

    def revoke(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self._event.set()

    async def wait(self) -> None:
        await self._event.wait()


class Takeover:
    """When a seat found empty may be claimed: once every earlier holder's lease has run out.

    A seat can vanish behind its holder's back (an operator deletes it, a lease is revoked from
    outside), and the holder, which may hear of it only at its next renewal, claims the seat
    until its lease runs out. That lease runs from when its last proving write was *sent*. Each
    write of the seat (or of a record beside it) is a new *version*, and every write made
    before a version was sent before anyone could receive that version. So a lease proven by
    any write up to the newest version this agent has seen ends by ``since + ttl``, ``since``
    being when that version was first received (clock rates agreeing). The claim itself must be
    a conditional write that fails if a newer version exists.

    Exceptions, where the seat may be claimed at once: its last holder resigned (it stood down
    before resigning), or this agent has seen no holder since it started (a new seat).
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        #: The newest version seen (None: the seat was missing), first received at ``since``.
        self.version: Hashable | None = None
        self.since = 0.0
        #: Some version of the seat has been seen since this agent started.
        self.held = False
        #: Not claiming before this monotonic time (set by the backend while it waits).
        self.pending_until: float | None = None

    def saw(self, version: Hashable | None, *, at: float | None = None) -> None:
        """The seat showed ``version`` (None: nothing) in an answer received at ``at``
        (default: now). Integer versions are revisions: an older one (replayed) is ignored."""
        if version is None and not self.held:
            return
        self.held = True
        if version == self.version:
            return
        if isinstance(version, int) and isinstance(self.version, int) and version < self.version:
            return
        self.version, self.since = version, time.monotonic() if at is None else at

    def claim_at(self, *, resigned: bool = False, ttl: float | None = None) -> float:
        """The monotonic time from which the seat may be claimed; ``ttl``: the last holder's,
        when it is known to be longer than ours."""
        if resigned or not self.held:
            return 0.0
        return self.since + max(self.ttl, ttl or 0.0)

    def waits(self, at: float, election: str, gone: str) -> bool:
        """Whether the seat may not be claimed yet (before ``at``, from ``claim_at``): then
        ``pending_until`` is ``at``, and the first such answer logs why (``gone``: who left
        the seat, or what became of it)."""
        left = at - time.monotonic()
        if left <= 0:
            return False
        if self.pending_until is None:
            log.info(
                "election %s: %s without a resign; waiting %.2fs for the last holder's lease "
                "to run out before campaigning",
                election,
                gone,
                left,
            )
        self.pending_until = at
        return True


@dataclass(frozen=True)
class Lease:
    """Proof of leadership: ``token`` is the fencing token, valid until ``expires`` (monotonic).

    ``revocation``, when the backend gives one, cuts the lease short the moment the backend
    learns on its own that the seat is gone; renewals of one term share it.
    """

    token: int
    expires: float
    revocation: Revocation | None = field(default=None, compare=False)

    @property
    def revoked(self) -> bool:
        return self.revocation is not None and self.revocation.revoked


@dataclass(frozen=True)
class Seat:
    """What the backend says about the seat: who holds it, with which token (None: empty)."""

    leader: str | None = None
    token: int | None = None


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


#: A text option that, when given, must say something (keys, channels, regions).
Text = Annotated[str, AfterValidator(_not_blank)]


class BackendOptions(BaseModel):
    """Base for each backend's options; unknown options are an error.

    The agent validates them with the context ``{"config_dir": <the config file's directory>}``
    so that a validator can resolve a relative path the way ``token_file`` is resolved.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


class Backend(ABC):
    """One election on one mechanism, for one agent.

    A backend declares itself in its class statement:
    ``class EtcdBackend(Backend, name="etcd", options=EtcdOptions, notifies=True)``.
    """

    #: The ``backend = "..."`` name in the agent config.
    name: ClassVar[str]
    Options: ClassVar[type[BackendOptions]] = BackendOptions
    #: True when followers are woken by the backend (watch, LISTEN, pub/sub) rather than polling.
    notifies: ClassVar[bool] = False

    def __init_subclass__(
        cls,
        *,
        name: str,
        options: type[BackendOptions] = BackendOptions,
        notifies: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        cls.name, cls.Options, cls.notifies = name, options, notifies

    def __init__(self, *, election: str, agent_id: str, ttl: float, options: Any) -> None:
        self.election = election
        self.agent_id = agent_id
        self.ttl = ttl
        self.options = options

    @classmethod
    def check_options(cls, options: Any, ttl: float) -> tuple[str, str] | None:
        """Cross-field checks: return (field, problem) or None."""
        return None

    @property
    def renew_interval(self) -> float:
        """How often the leader renews its lease."""
        return self.ttl / 3

    @property
    def retry_interval(self) -> float:
        """How long a follower waits between campaigns when nothing notifies it."""
        return self.ttl / 3

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect. Raise Unavailable to be retried, Misconfigured to stop the election."""

    @abstractmethod
    async def campaign(self) -> Lease | None:
        """Try once to take the seat. Return the lease when won, None when someone holds it."""

    @abstractmethod
    async def renew(self, lease: Lease) -> Lease:
        """Keep the seat: return the extended lease, raise Lost or Unavailable."""

    @abstractmethod
    async def resign(self, lease: Lease) -> None:
        """Give the seat up, only if it is still ours (a conditional delete or unlock)."""

    @abstractmethod
    async def observe(self) -> Seat:
        """Read who holds the seat now."""

    def hold(self) -> None:  # noqa: B027 - optional hook
        """The runner stays out of the race (a step-down, a switchover to another agent, the
        flap damper) until it calls ``campaign()`` again. A backend whose members campaign or
        accept a handover by themselves (Raft) must not do so meanwhile."""

    async def wait_for_change(self, timeout: float) -> None:
        """Return when the seat may have changed, or after ``timeout`` seconds."""
        await asyncio.sleep(timeout)

    async def transfer(self, lease: Lease, successor: str | None) -> bool:
        """Hand the seat to ``successor`` (or the best candidate). False when not supported."""
        return False

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections. Called once, after a resign when the agent was leading."""
