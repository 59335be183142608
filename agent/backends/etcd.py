"""Leader election on etcd v3, the way TiKV PD's ``Leadership`` does it.

- Campaign: grant a lease of TTL seconds, then one transaction puts the leader key with that
  lease only if the key's create revision is 0 (the key does not exist). The value is JSON
  naming the agent, so ``etcdctl get KEY`` shows who leads.
- Renew: a lease keep-alive every TTL/3. The local lease runs from the moment the keep-alive
  was *sent* plus TTL; etcd restarts its own countdown when it *receives* the request and its
  granted TTL is never shorter than ours (we ask for TTL rounded up), so the agent demotes
  before etcd can expire the lease and let another agent create the key.
- Lost: the keep-alive says the lease is gone (TTL <= 0: revoked or expired), or the key no
  longer carries our lease. Transport errors are Unavailable: the runner retries within what
  is left of the lease.
- Followers watch the key from the revision they last read, so a resign (the key deleted) or
  an expiry wakes them at once.
- Resign: delete the key only if its mod revision is still the one we wrote (a transaction),
  then revoke the lease.
- Fencing token: the key's create revision: constant during a term, larger in every later one.

Several endpoints may be given; on a transport error the next call goes to the next one (the
lease and the key live in the cluster, not on one member). TLS is not supported by the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aetcd
from aetcd import exceptions as etcd_errors
from pydantic import field_validator

from agent.backends.base import (
    Backend,
    BackendOptions,
    Lease,
    Lost,
    Misconfigured,
    Seat,
    Text,
    Unavailable,
)

log = logging.getLogger(__name__)

#: gRPC reconnects after a failure with an exponential backoff (1 s up to 120 s by default);
#: keep it short so that an etcd that comes back is used again within a renew interval.
CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
}


def parse_endpoint(value: str) -> tuple[str, int]:
    """``http://host:port`` (or plain ``host:port``) to (host, port)."""
    url = urlsplit(value if "://" in value else f"http://{value}")
    if url.scheme == "https":
        raise ValueError(f"{value!r}: TLS (https) endpoints are not supported")
    if url.scheme != "http" or not url.hostname or url.path not in ("", "/"):
        raise ValueError(f"expected an http://HOST:PORT URL, got {value!r}")
    try:
        port = url.port or 2379
    except ValueError:
        raise ValueError(f"bad port in {value!r}") from None
    return url.hostname, port


class EtcdOptions(BackendOptions):
    #: Client URLs of the etcd cluster members, e.g. ``["http://10.0.0.1:2379"]``.
    endpoints: list[str]
    #: The leader key; default ``/electorate/<election>``.
    key: Text | None = None

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one endpoint is required")
        for endpoint in value:
            parse_endpoint(endpoint)
        return value


class EtcdBackend(Backend):
    name = "etcd"
    Options = EtcdOptions
    notifies = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        opts: EtcdOptions = self.options
        self.key = (opts.key or f"/electorate/{self.election}").encode()
        self._endpoints = [parse_endpoint(e) for e in opts.endpoints]
        self._endpoint = 0
        self._client: aetcd.Client | None = None
        #: Per-call deadline for the client; the runner bounds calls by the lease as well.
        self._timeout = max(1.0, min(5.0, self.ttl))
        #: The etcd lease behind our seat, and the mod revision of the key we wrote.
        self._lease_id: int | None = None
        self._mod_revision = 0
        #: Watch from here: one past the oldest revision read since the last wait.
        self._watch_from: int | None = None

    # -- connection -------------------------------------------------------------------------

    def _connection(self) -> aetcd.Client:
        if self._client is None:
            host, port = self._endpoints[self._endpoint]
            self._client = aetcd.Client(
                host=host, port=port, timeout=self._timeout, options=dict(CHANNEL_OPTIONS)
            )
        return self._client

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), timeout=1.0)

    @contextlib.asynccontextmanager
    async def _translate(self, what: str) -> AsyncIterator[None]:
        """Map client errors: refusals are Misconfigured, the rest Unavailable."""
        try:
            yield
        except etcd_errors.UnauthenticatedError as exc:
            raise Misconfigured(f"etcd refused {what}: {exc}") from None
        except (etcd_errors.ClientError, OSError) as exc:
            if len(self._endpoints) > 1:
                # The lease and the key live in the cluster: carry on with the next member.
                self._endpoint = (self._endpoint + 1) % len(self._endpoints)
                await self._drop_client()
            raise Unavailable(f"etcd {what}: {exc or type(exc).__name__}") from None

    def _seen(self, revision: int) -> None:
        start = revision + 1
        self._watch_from = start if self._watch_from is None else min(self._watch_from, start)

    async def _read(self, what: str) -> tuple[Any, int]:
        """The leader key (or None) and the store revision of the read."""
        client = self._connection()
        async with self._translate(what):
            result = await client.get_range(self.key, self.key + b"\0")
        self._seen(result.header.revision)
        return (result[0] if result.count else None), result.header.revision

    def _value(self, lease_id: int) -> bytes:
        return json.dumps(
            {
                "agent": self.agent_id,
                "election": self.election,
                "lease": f"{lease_id:x}",
                "since": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        ).encode()

    async def _revoke_quietly(self, lease_id: int) -> None:
        # Best effort: an unrevoked lease expires by itself after TTL.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._connection().revoke_lease(lease_id), self._timeout)

    # -- the interface ----------------------------------------------------------------------

    async def open(self) -> None:
        await self._read("read")

    async def campaign(self) -> Lease | None:
        current, _ = await self._read("read")
        if current is not None:
            return None
        client = self._connection()
        sent = time.monotonic()
        async with self._translate("lease grant"):
            # etcd leases are whole seconds: round up so etcd never expires before we demote.
            granted = await client.lease(max(1, math.ceil(self.ttl)))
        if granted.ttl <= 0:
            raise Unavailable("etcd granted no lease")
        expires = sent + min(self.ttl, float(granted.ttl))
        tx = client.transactions
        try:
            async with self._translate("campaign"):
                won, responses = await client.transaction(
                    compare=[tx.create(self.key) == 0],
                    success=[
                        tx.put(self.key, self._value(granted.id), lease=granted.id),
                        tx.get(self.key),
                    ],
                    failure=[tx.get(self.key)],
                )
        except Unavailable:
            # The put may or may not have been applied: revoking the lease undoes it either way.
            await self._revoke_quietly(granted.id)
            raise
        if not won:
            await self._revoke_quietly(granted.id)
            for _, kv in responses[0]:
                self._seen(kv.header.revision)
            return None
        _, kv = responses[1][0]
        self._lease_id = granted.id
        self._mod_revision = kv.mod_revision
        return Lease(token=kv.create_revision, expires=expires)

    async def renew(self, lease: Lease) -> Lease:
        lease_id = self._lease_id
        if lease_id is None:
            raise Lost("no etcd lease is held")
        client = self._connection()
        sent = time.monotonic()
        async with self._translate("lease keep-alive"):
            reply = await client.refresh_lease(lease_id)
        if reply is None:
            raise Unavailable("etcd keep-alive stream ended without an answer")
        if reply.TTL <= 0:
            self._lease_id = None
            raise Lost("the etcd lease was revoked or has expired")
        kv, _ = await self._read("read")
        if kv is None or kv.lease != lease_id or kv.create_revision != lease.token:
            self._lease_id = None
            await self._revoke_quietly(lease_id)
            raise Lost("the leader key no longer carries our lease")
        self._mod_revision = kv.mod_revision
        return Lease(token=lease.token, expires=sent + min(self.ttl, float(reply.TTL)))

    async def resign(self, lease: Lease) -> None:
        lease_id, self._lease_id = self._lease_id, None
        client = self._connection()
        tx = client.transactions
        try:
            async with self._translate("resign"):
                await client.transaction(
                    compare=[tx.mod(self.key) == self._mod_revision],
                    success=[tx.delete(self.key)],
                    failure=[],
                )
        finally:
            if lease_id is not None:
                async with self._translate("lease revoke"):
                    await client.revoke_lease(lease_id)

    async def observe(self) -> Seat:
        kv, _ = await self._read("read")
        if kv is None:
            return Seat()
        try:
            leader = str(json.loads(kv.value)["agent"])
        except (ValueError, KeyError, TypeError):
            leader = kv.value.decode(errors="replace")
        return Seat(leader=leader, token=kv.create_revision)

    async def wait_for_change(self, timeout: float) -> None:
        """Watch the key from the revision read last; return on its next event."""
        start, self._watch_from = self._watch_from, None
        deadline = time.monotonic() + timeout
        client = self._connection()
        try:
            event = await asyncio.wait_for(
                client.watch_once(self.key, timeout=timeout, start_revision=start),
                timeout=timeout,
            )
        except (TimeoutError, etcd_errors.WatchTimeoutError):
            return
        except etcd_errors.RevisionCompactedError:
            return  # that history is gone: the seat may have changed, read it again
        except (etcd_errors.ClientError, OSError) as exc:
            event = exc
        if isinstance(event, etcd_errors.RevisionCompactedError):
            return
        if event is None or isinstance(event, Exception):
            # The watch could not start or its stream broke: never spin on it, wait out the
            # rest of the timeout as a plain poll.
            log.debug("election %s: etcd watch failed: %s", self.election, event)
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))

    async def close(self) -> None:
        lease_id, self._lease_id = self._lease_id, None
        if lease_id is not None:
            await self._revoke_quietly(lease_id)
        await self._drop_client()
