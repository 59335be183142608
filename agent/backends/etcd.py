"""Leader election on etcd v3, the way TiKV PD's ``Leadership`` does it, made safe against a
seat removed behind the leader's back.

Two keys, read and watched together as the range ``[KEY, KEY + "\\1")``:

- the **seat** ``KEY``, attached to the holder's etcd lease; its value is JSON naming the
  agent, so ``etcdctl get KEY`` shows who leads;
- the **record** ``KEY + "\\0holder"``, without a lease, so it outlives the seat: who held the
  seat last, with which TTL, and whether they resigned. Every renewal rewrites it, so its mod
  revision marks the holder's last renewal.

- Campaign: grant a lease of TTL seconds, then one transaction creates the seat with that
  lease (only if its create revision is 0) and writes the record ``leading`` (only if the
  record is still the version the decision to campaign was based on).
- Renew: a lease keep-alive every TTL/3, then a transaction that rewrites the record only while
  the seat is still the one we created (create and mod revision = our token). The local lease
  runs from the moment the keep-alive was *sent* plus TTL; etcd restarts its own countdown when
  it *receives* the request and grants at least our TTL (we ask for TTL rounded up), so the
  agent demotes before etcd can expire the lease. Only a renewal whose record write succeeded
  extends the lease (see below why).
- Lost: the keep-alive says the lease is gone, the seat is no longer ours, or the leader's own
  watch saw the seat deleted or rewritten. Transport errors are Unavailable: the runner retries
  within what is left of the lease.
- Resign: one transaction deletes the seat and marks the record ``resigned`` (only if the seat
  is still ours), then the lease is revoked.
- Fencing token: the seat's create revision: constant during a term, larger in every later one.

A seat removed behind the leader's back
---------------------------------------
Whatever removes the seat (a resign, the lease expiring, ``etcdctl lease revoke``, ``etcdctl
del``) sends every watcher the same DELETE, and a follower can win within milliseconds. Two
rules keep that from making two leaders:

1. The leader watches its own seat and revokes its lease locally (``Lease.revocation``) the
   moment the seat is deleted or rewritten: ``is_leader()`` turns false at once, not at the
   next keep-alive up to TTL/3 later.
2. That is still a race, and a leader cut off from etcd hears nothing at all. So a follower
   that finds the seat empty claims it only once every earlier holder's lease has surely run
   out, judged from the record:

   - the record says ``resigned``: at once (a leader stands down before it resigns);
   - no record, and this agent has seen no holder since it started: at once (a new seat);
   - otherwise at ``seen + TTL``, where ``seen`` is when this agent first saw the record's
     current version (with no record: first saw it missing) and TTL the larger of ours and the
     holder's. Every extension of a holder's lease was sent before a record write that is no
     newer than that version, so no lease runs past ``seen + TTL``. The campaign transaction
     checks the record is still that version.

   When the lease expired by itself (a killed leader), etcd deleted the seat no earlier than
   TTL after the last keep-alive, and a watching follower saw that renewal's record write
   milliseconds after it was sent: the wait is already over, so a killed leader is replaced
   within TTL (plus etcd's expiry sweep, up to 0.5 s) as before. After a revoke or a delete
   the winner waits up to TTL, with nobody leading meanwhile, as PostgreSQL's winner waits out
   a predecessor that did not resign. An agent that starts while the record names a holder
   that did not resign waits a whole TTL.

Why not bound the old lease with ``LeaseTimeToLive`` instead: etcd reports whole seconds,
rounded down, so a follower could place the holder's expiry only within a second (a killed
leader would no longer be replaced within TTL + 1 s), and any keep-alive after the follower's
last query moves the expiry past the bound it took. The record costs one small write (and one
revision) per renewal: run etcd with auto-compaction on.

Followers watch the range from the revision they last read: a record write (a renewal) is
noted without waking the runner, a change of the seat wakes it.

Several endpoints may be given; on a transport error the next call goes to the next one (the
lease and the keys live in the cluster, not on one member). TLS is not supported by the client.
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

from agent.aio import cancelled
from agent.backends.base import Backend, BackendOptions, Lease, Revocation, Seat, Takeover, Text
from agent.backends.errors import Lost, Misconfigured, Unavailable, unavailable

log = logging.getLogger(__name__)

#: gRPC reconnects after a failure with an exponential backoff (1 s up to 120 s by default);
#: keep it short so that an etcd that comes back is used again within a renew interval.
CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
}
#: How soon the leader's own watch is set up again after it broke (renewals guard meanwhile).
GUARD_RETRY = 0.2


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


def _json(value: bytes) -> dict[str, Any]:
    try:
        data = json.loads(value)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


class EtcdBackend(Backend, name="etcd", options=EtcdOptions, notifies=True):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        opts: EtcdOptions = self.options
        self.key = (opts.key or f"/electorate/{self.election}").encode()
        #: The record beside the seat; NUL keeps it inside [key, key + 1) and off any real key.
        self.record_key = self.key + b"\0holder"
        self._range_end = self.key + b"\1"
        self._endpoints = [parse_endpoint(e) for e in opts.endpoints]
        self._endpoint = 0
        self._client: aetcd.Client | None = None
        #: Per-call deadline for the client; the runner bounds calls by the lease as well.
        self._timeout = max(1.0, min(5.0, self.ttl))
        #: The etcd lease behind our seat, the term's revocation and the watch that fires it.
        self._lease_id: int | None = None
        self._revocation: Revocation | None = None
        self._guard_task: asyncio.Task[None] | None = None
        #: Watch from here: one past the oldest revision read since the last wait.
        self._watch_from: int | None = None
        #: Which record version was seen first when: an earlier holder's lease may still run.
        self._takeover = Takeover(self.ttl)

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
                # The lease and the keys live in the cluster: carry on with the next member.
                self._endpoint = (self._endpoint + 1) % len(self._endpoints)
                await self._drop_client()
            raise unavailable(f"etcd {what}", exc) from None

    # -- what this agent has seen -----------------------------------------------------------

    def _seen(self, revision: int) -> None:
        start = revision + 1
        self._watch_from = start if self._watch_from is None else min(self._watch_from, start)

    def _note(self, seat: Any, record: Any) -> None:
        """Remember when each record version was first seen (after etcd applied it)."""
        if record is not None:
            self._takeover.saw(record.mod_revision)
        elif seat is not None:
            # A seat without a record (written by hand, or by an older agent): its renewals
            # cannot be seen, so the wait counts from when it is gone.
            self._takeover.saw(("seat", seat.mod_revision))
        else:
            self._takeover.saw(None)

    def _split(self, kvs: Any) -> tuple[Any, Any]:
        seat = record = None
        for kv in kvs:
            if kv.key == self.key:
                seat = kv
            elif kv.key == self.record_key:
                record = kv
        return seat, record

    async def _read(self, what: str) -> tuple[Any, Any]:
        """The seat and the record (each None when absent), noted as seen."""
        client = self._connection()
        async with self._translate(what):
            result = await client.get_range(self.key, self._range_end)
        self._seen(result.header.revision)
        seat, record = self._split(result)
        self._note(seat, record)
        return seat, record

    def _from_txn(self, responses: list[Any]) -> tuple[Any, Any, int | None]:
        """The seat, the record and the revision from a transaction's closing range read."""
        items = responses[-1] if responses else []
        seat, record = self._split(kv for _, kv in items)
        revision = items[0][1].header.revision if items else None
        self._note(seat, record)
        return seat, record, revision

    def _takeover_at(self, record: Any) -> float:
        """When an empty seat may be claimed: once every earlier holder's lease has run out."""
        if record is None:
            return self._takeover.claim_at()
        info = _json(record.value)
        try:
            ttl = float(info.get("ttl", 0))
        except (TypeError, ValueError):
            ttl = self.ttl
        return self._takeover.claim_at(resigned=info.get("state") == "resigned", ttl=ttl)

    # -- values -----------------------------------------------------------------------------

    def _seat_value(self, lease_id: int) -> bytes:
        return json.dumps(
            {
                "agent": self.agent_id,
                "election": self.election,
                "lease": f"{lease_id:x}",
                "since": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        ).encode()

    def _record_value(self, lease_id: int, state: str) -> bytes:
        return json.dumps(
            {"agent": self.agent_id, "lease": f"{lease_id:x}", "ttl": self.ttl, "state": state}
        ).encode()

    async def _revoke_quietly(self, lease_id: int) -> None:
        # Best effort: an unrevoked lease expires by itself after TTL.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._connection().revoke_lease(lease_id), self._timeout)

    # -- the leader's watch on its own seat -------------------------------------------------

    def _gone(self, event: Any, token: int, lease_id: int) -> str | None:
        """Why this event means the seat is no longer ours, or None."""
        kv = event.kv
        if kv.key == self.key:
            if event.kind == "DELETE":
                return f"the leader key was deleted (revision {kv.mod_revision})"
            if kv.create_revision != token or kv.lease != lease_id:
                return f"the leader key was rewritten (revision {kv.mod_revision})"
            return None
        ours = _json(kv.value).get("lease") == f"{lease_id:x}"
        if kv.key == self.record_key and event.kind == "PUT" and not ours:
            return f"another agent wrote the record (revision {kv.mod_revision})"
        return None

    async def _guard(self, token: int, lease_id: int, start: int, revocation: Revocation) -> None:
        """Watch our own seat from ``start``; revoke the lease the moment it is gone."""
        while not revocation.revoked:
            try:
                watch = await self._connection().watch(
                    self.key, range_end=self._range_end, start_revision=start
                )
                try:
                    async for event in watch:
                        start = event.kv.mod_revision + 1
                        why = self._gone(event, token, lease_id)
                        if why is not None:
                            log.info("election %s: %s; standing down", self.election, why)
                            revocation.revoke(why)
                            return
                finally:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(watch.cancel(), 1.0)
            except etcd_errors.RevisionCompactedError:
                # The events since `start` are gone: read where we stand and go on from there.
                with contextlib.suppress(etcd_errors.ClientError, OSError, TimeoutError):
                    client = self._connection()
                    result = await asyncio.wait_for(
                        client.get_range(self.key, self._range_end), self._timeout
                    )
                    seat, _ = self._split(result)
                    if seat is None or seat.create_revision != token or seat.lease != lease_id:
                        revocation.revoke("the leader key is gone (seen after a compaction)")
                        return
                    start = result.header.revision + 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the renewals still guard the lease meanwhile
                log.debug("election %s: own watch broke: %s", self.election, exc)
            await asyncio.sleep(GUARD_RETRY)

    async def _stop_guard(self) -> None:
        task, self._guard_task = self._guard_task, None
        await cancelled(task)

    async def _abandon(self) -> None:
        """Drop what is left of an earlier term of ours (its seat was taken away)."""
        await self._stop_guard()
        lease_id, self._lease_id = self._lease_id, None
        if lease_id is not None:
            await self._revoke_quietly(lease_id)

    # -- the interface ----------------------------------------------------------------------

    async def open(self) -> None:
        await self._read("read")

    async def campaign(self) -> Lease | None:
        await self._abandon()
        seat, record = await self._read("read")
        if seat is not None:
            self._takeover.pending_until = None
            return None
        holder = _json(record.value).get("agent") if record is not None else "unknown"
        if self._takeover.waits(self._takeover_at(record), self.election, f"{holder} left"):
            return None
        self._takeover.pending_until = None
        return await self._take(record.mod_revision if record is not None else 0)

    async def _take(self, record_mod: int) -> Lease | None:
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
                    compare=[tx.create(self.key) == 0, tx.mod(self.record_key) == record_mod],
                    success=[
                        tx.put(self.key, self._seat_value(granted.id), lease=granted.id),
                        tx.put(self.record_key, self._record_value(granted.id, "leading")),
                        tx.get(self.key, self._range_end),
                    ],
                    failure=[tx.get(self.key, self._range_end)],
                )
        except Unavailable:
            # The put may or may not have been applied: revoking the lease undoes it either way.
            await self._revoke_quietly(granted.id)
            raise
        seat, _, revision = self._from_txn(responses)
        if revision is not None:
            self._seen(revision)
        if not won or seat is None or revision is None:
            await self._revoke_quietly(granted.id)
            return None
        self._lease_id = granted.id
        self._revocation = revocation = Revocation()
        self._guard_task = asyncio.create_task(
            self._guard(seat.create_revision, granted.id, revision + 1, revocation),
            name=f"etcd guard {self.election}",
        )
        return Lease(token=seat.create_revision, expires=expires, revocation=revocation)

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
            await self._abandon()
            raise Lost("the etcd lease was revoked or has expired")
        tx = client.transactions
        async with self._translate("renew"):
            # The record write is what lets a follower bound this extension (module docstring).
            ours, responses = await client.transaction(
                compare=[tx.create(self.key) == lease.token, tx.mod(self.key) == lease.token],
                success=[
                    tx.put(self.record_key, self._record_value(lease_id, "leading")),
                    tx.get(self.key, self._range_end),
                ],
                failure=[tx.get(self.key, self._range_end)],
            )
        self._from_txn(responses)
        if not ours:
            await self._abandon()
            raise Lost("the leader key no longer carries our lease")
        return Lease(lease.token, sent + min(self.ttl, float(reply.TTL)), self._revocation)

    async def resign(self, lease: Lease) -> None:
        await self._stop_guard()
        lease_id, self._lease_id = self._lease_id, None
        client = self._connection()
        tx = client.transactions
        try:
            if lease_id is not None:
                async with self._translate("resign"):
                    await client.transaction(
                        compare=[
                            tx.create(self.key) == lease.token,
                            tx.mod(self.key) == lease.token,
                        ],
                        success=[
                            tx.delete(self.key),
                            tx.put(self.record_key, self._record_value(lease_id, "resigned")),
                        ],
                        failure=[],
                    )
        finally:
            if lease_id is not None:
                async with self._translate("lease revoke"):
                    await client.revoke_lease(lease_id)

    async def observe(self) -> Seat:
        seat, _ = await self._read("read")
        if seat is None:
            return Seat()
        leader = _json(seat.value).get("agent")
        if not isinstance(leader, str):
            leader = seat.value.decode(errors="replace")
        return Seat(leader=leader, token=seat.create_revision)

    async def wait_for_change(self, timeout: float) -> None:
        """Watch from the revision read last; return when the seat changes (renewals, which
        only rewrite the record, are noted on the way) or when an empty seat may be claimed."""
        start, self._watch_from = self._watch_from, None
        deadline = time.monotonic() + timeout
        pending = self._takeover.pending_until
        if pending is not None:
            deadline = min(deadline, pending)
        client = self._connection()
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                watch = await client.watch(
                    self.key, range_end=self._range_end, start_revision=start
                )
                try:
                    async for event in watch:
                        if event.kv.key == self.record_key and event.kind == "PUT":
                            self._note(None, event.kv)
                            continue
                        return
                finally:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(watch.cancel(), 1.0)
        except (TimeoutError, etcd_errors.WatchTimeoutError):
            return
        except etcd_errors.RevisionCompactedError:
            return  # that history is gone: the seat may have changed, read it again
        except (etcd_errors.ClientError, OSError) as exc:
            # The watch could not start or its stream broke: never spin on it, wait out the
            # rest of the timeout as a plain poll.
            log.debug("election %s: etcd watch failed: %s", self.election, exc)
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))

    async def close(self) -> None:
        await self._abandon()
        await self._drop_client()
