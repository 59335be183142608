"""Redis election on one key: ``SET key value NX PX ttl``, kept and given up by compare-and-set.

- Campaign: one Lua script sets the key only when absent *and* takes the fencing token with
  ``INCR key:token``, so a win and its token are atomic (no token is spent without a win, no
  win goes without one). The value is JSON ``{"agent": ..., "token": ..., "nonce": ...}``; the
  random nonce is new on every win, so a restarted agent with the same id never mistakes an
  old seat for its own (``redis-cli GET key`` names the leader).
- Renew: ``PEXPIRE`` only if the key still holds exactly our value; anything else is ``Lost``.
  The lease runs ``ttl`` less 2 ms from when the renew was *sent*. Redis counts the key's
  ``ttl`` from when it ran the script, later, but in whole milliseconds of its clock, so the
  key can expire up to a millisecond before ``ttl`` has passed; on loopback that is more than
  the round trip, hence the 2 ms, so the leader's lease always ends first. A connection error
  or a timeout is ``Unavailable``: the runner retries within the lease and demotes when it runs
  out, before Redis can expire the key and hand the seat to another.
- Resign: ``DEL`` only if ours, then ``PUBLISH`` on the channel, in one script (a win
  publishes too, so followers name the new leader at once).

A seat deleted behind the leader's back (``redis-cli DEL key``) would be won by the next
campaign while the old leader, which hears of it only at its next renewal, still claims it.
So every win and renewal also writes the *record* ``key:holder`` with the same value and the
same expiry as the seat: it expires exactly when the seat would have, i.e. after the holder's
lease. A campaign that finds the seat gone but the record alive waits out the record's
``PTTL`` (on the server's clock, like the seat itself) before claiming; a resign deletes both,
so it is taken over at once, and an expired seat has taken its record with it. Deleting the
record as well by hand removes this protection.
- Followers subscribe to the channel (a resign or a win wakes them at once) and poll every
  ``ttl / 3``: an expiring key publishes nothing unless the server has keyspace events on
  (``notify-keyspace-events Kx``; we subscribe to the key's ``expired`` event too, so it helps
  when enabled).

Key expiry runs on the Redis server's wall clock; a server clock jump can expire a key early.
The token key (``key:token``) is kept forever so tokens only grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from typing import Any

from pydantic import field_validator
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    RedisError,
    ResponseError,
)

from agent.backends.base import Backend, BackendOptions, Lease, Seat, Text
from agent.backends.errors import BackendError, Lost, Misconfigured, Unavailable, unavailable

log = logging.getLogger(__name__)

# Taken off every lease: Redis keeps expiries in whole milliseconds of its own clock.
_EXPIRY_SLACK_MS = 2

# KEYS: seat, token counter, record. ARGV: agent id, nonce, ttl in ms, channel.
# Returns {token, value} when won (and tells the followers), nil when the seat is taken, and
# the milliseconds the last holder's lease may still run when the seat was removed under it.
_CAMPAIGN = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local left = redis.call('PTTL', KEYS[3])
if left > 0 then return left end
local token = redis.call('INCR', KEYS[2])
local value = '{"agent":' .. cjson.encode(ARGV[1]) .. ',"token":' .. token
    .. ',"nonce":"' .. ARGV[2] .. '"}'
redis.call('SET', KEYS[1], value, 'NX', 'PX', ARGV[3])
redis.call('SET', KEYS[3], value, 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4], '{"event":"won","agent":' .. cjson.encode(ARGV[1])
    .. ',"token":' .. token .. '}')
return {token, value}
"""
# KEYS: seat, record. ARGV: our value, ttl in ms. Returns 1, or what the seat holds instead
# (nil: none).
_RENEW = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
    return 1
end
return current
"""
# KEYS: seat, record. ARGV: our value, channel, message. Returns 1 when released, 0 when the
# seat is not ours. Our record goes either way: the runner stopped claiming before resigning.
_RELEASE = """
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    redis.call('PUBLISH', ARGV[2], ARGV[3])
    return 1
end
return 0
"""


class RedisOptions(BackendOptions):
    url: str
    #: The seat; default ``electorate:<election>``.
    key: Text | None = None
    #: Where a resign is published; default ``<key>:events``.
    channel: Text | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {value!r}")
        return value


class RedisBackend(Backend, name="redis", options=RedisOptions, notifies=True):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        opts: RedisOptions = self.options
        self._url = opts.url
        self.key = opts.key or f"electorate:{self.election}"
        self.token_key = f"{self.key}:token"
        self.record_key = f"{self.key}:holder"
        self.channel = opts.channel or f"{self.key}:events"
        self._ttl_ms = max(1, int(self.ttl * 1000))
        # Bounds each command; the runner bounds each call by what is left of the lease too.
        self._timeout = min(max(self.ttl / 3, 0.2), 5.0)
        self._client: Redis | None = None
        self._pubsub: PubSub | None = None
        self._scripts: dict[str, Any] = {}
        #: Our seat's exact value while we hold it: renew and resign compare against it.
        self._value: str | None = None
        #: Not claiming before then: the seat was removed while its holder's lease ran.
        self._pending_until: float | None = None

    # -- connection -----------------------------------------------------------------------

    async def open(self) -> None:
        await self._connection()
        await self._subscription()

    async def _connection(self) -> Redis:
        if self._client is not None:
            return self._client
        client = Redis.from_url(
            self._url,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            # No hidden retries with back-off: the runner decides when to try again.
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
            client_name=f"electorate:{self.agent_id}"[:64].replace(" ", "_"),
        )
        try:
            await client.ping()
        except (AuthenticationError, NoPermissionError) as exc:
            await client.aclose()
            raise Misconfigured(f"Redis refused us: {exc}") from None
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise unavailable("cannot reach Redis", exc) from None
        self._client = client
        self._scripts = {
            "campaign": client.register_script(_CAMPAIGN),
            "renew": client.register_script(_RENEW),
            "release": client.register_script(_RELEASE),
        }
        return client

    async def _subscription(self) -> PubSub | None:
        """The follower's subscription, (re)made on demand; None while Redis is unreachable."""
        if self._pubsub is not None:
            return self._pubsub
        client = await self._connection()
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        db = client.connection_pool.connection_kwargs.get("db", 0)
        try:
            await pubsub.subscribe(self.channel, f"__keyspace@{db}__:{self.key}")
        except (RedisError, OSError) as exc:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            log.debug("election %s: cannot subscribe: %s", self.election, exc)
            return None
        self._pubsub = pubsub
        return pubsub

    async def _drop(self) -> None:
        """Close our connections (not the seat: the key stays until it expires)."""
        pubsub, client = self._pubsub, self._client
        self._pubsub, self._client, self._scripts = None, None, {}
        for closable in (pubsub, client):
            if closable is not None:
                with contextlib.suppress(Exception):
                    await closable.aclose()

    async def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        await self._connection()
        try:
            return await self._scripts[script](keys=keys, args=args)
        except (AuthenticationError, NoPermissionError) as exc:
            raise Misconfigured(f"Redis refused us: {exc}") from None
        except ResponseError as exc:
            if "WRONGTYPE" in str(exc):
                raise Misconfigured(f"{self.key} or {self.token_key} holds another type") from None
            raise unavailable("Redis error", exc) from None
        except (RedisError, OSError) as exc:
            # Drop the client: a timed-out connection may still deliver a stale answer.
            await self._drop()
            raise unavailable("Redis unavailable", exc) from None

    # -- the election ---------------------------------------------------------------------

    async def campaign(self) -> Lease | None:
        nonce = secrets.token_hex(8)
        sent = time.monotonic()
        result = await self._run(
            "campaign",
            [self.key, self.token_key, self.record_key],
            [self.agent_id, nonce, self._ttl_ms, self.channel],
        )
        if isinstance(result, int):
            if self._pending_until is None:
                log.info(
                    "election %s: %s was removed before its holder's lease ran out; waiting "
                    "%.2fs before campaigning",
                    self.election,
                    self.key,
                    result / 1000,
                )
            self._pending_until = time.monotonic() + result / 1000
            return None
        self._pending_until = None
        if not result:
            return None
        token, value = result
        self._value = value
        return Lease(int(token), self._lease_end(sent))

    def _lease_end(self, sent: float) -> float:
        # Redis floors its clock to the millisecond when it sets an expiry: see the docstring.
        return sent + (self._ttl_ms - _EXPIRY_SLACK_MS) / 1000

    async def renew(self, lease: Lease) -> Lease:
        value = self._value
        if value is None:
            raise Lost("this agent holds no seat to renew")
        sent = time.monotonic()
        try:
            result = await self._run("renew", [self.key, self.record_key], [value, self._ttl_ms])
        except Misconfigured as exc:  # not a reason to stop the loop while leading
            raise Unavailable(str(exc)) from None
        if result == 1:
            return Lease(lease.token, self._lease_end(sent))
        self._value = None
        if result is None:
            raise Lost(f"{self.key} expired before it could be renewed")
        raise Lost(f"{self.key} was taken over: it holds {result}")

    async def resign(self, lease: Lease) -> None:
        value, self._value = self._value, None
        if value is None:
            return
        message = json.dumps({"event": "resigned", "agent": self.agent_id, "token": lease.token})
        await self._run("release", [self.key, self.record_key], [value, self.channel, message])

    async def observe(self) -> Seat:
        client = await self._connection()
        try:
            raw, token = await client.mget(self.key, self.token_key)
        except (RedisError, OSError) as exc:
            await self._drop()
            raise unavailable("Redis unavailable", exc) from None
        if raw is None:
            return Seat(None, _int(token))
        try:
            seat = json.loads(raw)
            return Seat(str(seat["agent"]), int(seat["token"]))
        except (ValueError, TypeError, KeyError):
            return Seat(raw, _int(token))  # not written by us: show it as it is

    async def wait_for_change(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self._pending_until is not None:
            deadline = min(deadline, self._pending_until)
        try:
            pubsub = await self._subscription()
        except BackendError:
            pubsub = None
        while pubsub is not None and (left := deadline - time.monotonic()) > 0:
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
            except (RedisError, OSError):
                await self._drop()
                break
            if message is not None:
                return
        left = deadline - time.monotonic()
        if left > 0:
            await asyncio.sleep(left)

    async def close(self) -> None:
        await self._drop()


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
