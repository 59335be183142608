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
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict


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


class BackendError(Exception):
    """Base for backend failures."""


class Lost(BackendError):
    """Leadership is gone for certain (a compare-and-set failed, the session or lease died)."""


class Unavailable(BackendError):
    """The backend could not be reached or did not answer: leadership is unknown, not lost."""


class Misconfigured(BackendError):
    """The backend refuses this configuration (e.g. a NATS bucket whose TTL disagrees)."""


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
    """One election on one mechanism, for one agent."""

    #: The ``backend = "..."`` name in the agent config.
    name: ClassVar[str]
    Options: ClassVar[type[BackendOptions]] = BackendOptions
    #: True when followers are woken by the backend (watch, LISTEN, pub/sub) rather than polling.
    notifies: ClassVar[bool] = False

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
