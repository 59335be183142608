"""Election over a NATS JetStream key-value bucket (choria's design, fixed).

One key per election in a bucket whose TTL (the stream's max age) bounds failover:

- a candidate ``create``s the key, which succeeds only when it is absent, deleted or aged out;
- the leader keeps it with ``update`` conditioned on the last revision it wrote; a
  compare-and-set failure means another agent holds the seat: ``Lost`` at once;
- a transport error or timeout is ``Unavailable``, not a loss: the runner retries within what
  is left of the lease and demotes only when the lease cannot be proven;
- the lease runs from when the proving create/update was *sent* plus the TTL; the server ages
  the key out TTL after it *stored* the write, which is later, so the leader always stands
  down first (assuming the server's clock does not jump);
- resign is a delete conditioned on our last revision, which watching followers see at once;
  its delete marker carries a body ``{"resigned": true, ...}`` (the server and other KV
  clients go by the ``KV-Operation`` header alone) so that followers can tell it from a
  delete by someone else;
- followers watch the key and also poll every TTL/3, because a key that ages out sends no
  watch event on NATS 2.9.

A seat deleted or purged behind the leader's back (``nats kv del``) would be won by a watching
follower within milliseconds, while the leader hears of it only at its next renewal. So:

1. A candidate claims a key that is a delete or purge marker (not a resign) only once every
   earlier holder's lease has run out: TTL after it first saw that marker or a newer revision
   (``Takeover``), with a write conditioned on that marker's revision. A key with no message
   at all has aged out, TTL after its last write: it is claimed at once.
2. The leader's own watch revokes its lease (``Lease.revocation``) the moment it sees a marker
   or another agent's write on the key, so it stops claiming well before that.

The agent creates the bucket with the election's TTL when it is missing, and refuses to start
(``Misconfigured``) when an existing bucket's TTL disagrees: the TTL *is* the failover bound.

Fencing token: the KV revision (stream sequence) of the write that *began* the term, i.e. the
winning create. Renewals write new revisions too, but the token stays the same for the whole
term so that one term shows one token; the leader stores it in the value from its first renewal
on (until then the entry's own revision is the token). Sequences only grow within a bucket, so
tokens grow across leaders (recreating the bucket restarts them: do not delete a live bucket).

Value: JSON ``{"agent", "election", "token", "nonce"}``; ``nonce`` identifies this backend
instance. A write of ours can land although its answer was lost (a timeout during a network
blip); the next conditional write then fails against our *own* revision. When the key still
holds our nonce (and, while leading, our term), no one else has held the seat since, so we adopt
the current revision instead of reporting a loss that did not happen. A plain non-JSON value
(as choria writes) is shown as the leader's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue
from pydantic import field_validator

from agent.aio import cancelled
from agent.backends.base import Backend, BackendOptions, Lease, Revocation, Seat, Takeover
from agent.backends.errors import Lost, Misconfigured, Unavailable, unavailable
from agent.durations import Duration

log = logging.getLogger(__name__)


_BUCKET = re.compile(r"^[A-Za-z0-9_-]+$")
#: NATS KV keys: subject tokens separated by dots, none empty.
_KEY = re.compile(r"^[-/_=A-Za-z0-9]+(\.[-/_=A-Za-z0-9]+)*$")
_PLAIN = re.compile(r"[A-Za-z0-9_-]")
#: Pause between renewal attempts after a transport error.
RETRY_PAUSE = 0.1
#: JetStream "wrong last sequence" error codes (the compare-and-set failed).
_WRONG_LAST = (10071, 10164)
#: The KV operation header and its marker values (ADR-8).
_KV_OP = "KV-Operation"
_EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
_MARKERS = ("DEL", "PURGE")


def election_key(election: str) -> str:
    """The default key for an election name, injective and valid as a NATS subject.

    ``/`` becomes ``.`` (so ``orders/db`` is ``orders.db`` for ``nats kv get``); any other
    character outside ``[A-Za-z0-9_-]`` becomes ``=XX`` (``=`` never occurs in a name, so two
    names never share a key). A name with an empty ``/`` segment escapes its slashes too.
    """

    def escape(text: str) -> str:
        return "".join(c if _PLAIN.match(c) else f"={ord(c):02X}" for c in text)

    parts = election.split("/")
    if all(parts):
        return ".".join(escape(p) for p in parts)
    return escape(election)


class NatsOptions(BackendOptions):
    #: One server URL, or several separated by commas.
    url: str
    bucket: str = "electorate"
    #: Defaults to the election name mapped by ``election_key``.
    key: str | None = None
    #: Defaults to TTL/3 (choria renews at 0.75 x TTL).
    renew_interval: Duration | None = None
    #: Random delay before the first campaign, so a fleet starting together does not stampede.
    splay: Duration = 0.25
    #: Report "won" only after the first renewal succeeded (choria's behaviour).
    won_after_renew: bool = False

    @field_validator("url")
    @classmethod
    def _urls(cls, value: str) -> str:
        for url in value.split(","):
            if not re.match(r"^(nats|tls|ws|wss)://[^\s/]+/?$", url.strip()):
                raise ValueError(
                    f"expected nats://HOST:PORT (comma-separated for several), got {url!r}"
                )
        return value

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        if not _BUCKET.match(value):
            raise ValueError("a bucket name may use only letters, digits, '-' and '_'")
        return value

    @field_validator("key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        if value is not None and not _KEY.match(value):
            raise ValueError(
                "a key may use letters, digits, '-', '_', '=', '/' and '.', "
                "and may not start or end with '.' or contain '..'"
            )
        return value


class NatsBackend(Backend, name="nats", options=NatsOptions, notifies=True):
    @classmethod
    def check_options(cls, options: NatsOptions, ttl: float) -> tuple[str, str] | None:
        if ttl < 1.0:
            return "ttl", "must be at least 1s with the nats backend (the bucket's max age)"
        if options.renew_interval is not None and not 0 < options.renew_interval < ttl:
            return "renew_interval", f"must be above 0 and below the ttl ({ttl:g}s)"
        if options.splay >= ttl:
            return "splay", f"must be below the ttl ({ttl:g}s)"
        return None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        opts: NatsOptions = self.options
        self.key = opts.key or election_key(self.election)
        self.bucket = opts.bucket
        #: Every JetStream request is bounded by this, well inside a renew interval.
        self.request_timeout = min(2.0, max(0.25, self.ttl / 4))
        self._nonce = secrets.token_hex(8)
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._splayed = opts.splay <= 0
        #: Token of the term we lead (the revision that began it) and our last written revision.
        self._term: int | None = None
        self._rev: int | None = None
        #: Cut short by our own watch when the key is deleted or written by another.
        self._revocation: Revocation | None = None
        #: When each revision of the key was first seen: an earlier holder's lease may run.
        self._takeover = Takeover(self.ttl)
        self._last_error: str | None = None

    @property
    def renew_interval(self) -> float:
        return self.options.renew_interval or self.ttl / 3

    @property
    def retry_interval(self) -> float:
        # An aged-out key sends no watch event: poll at least this often.
        return self.ttl / 3

    # -- connection -----------------------------------------------------------------------

    async def open(self) -> None:
        await self.close()
        self._changed = asyncio.Event()
        nc = Client()
        servers = [u.strip() for u in self.options.url.split(",")]
        budget = max(2.0, min(self.ttl, 5.0))
        try:
            # nats-py retries the first connect forever when reconnects are unlimited: bound it.
            await asyncio.wait_for(
                nc.connect(
                    servers,
                    name=f"electorate {self.agent_id} {self.election}",
                    connect_timeout=min(budget, max(1.0, self.ttl / 2)),
                    reconnect_time_wait=0.25,
                    max_reconnect_attempts=-1,
                    # Detect a dead connection within a couple of TTLs and reconnect.
                    ping_interval=min(10.0, max(1.0, self.ttl / 2)),
                    max_outstanding_pings=2,
                    # Fail fast while reconnecting instead of buffering writes that could land
                    # late: a late conditional write is harmless but a fast error lets us retry.
                    pending_size=0,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                ),
                timeout=budget,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 1)
            reason = self._last_error or exc
            raise unavailable(f"cannot connect to NATS at {self.options.url}", reason) from None
        self._nc = nc
        try:
            self._kv = await self._bucket(nc)
            watcher = await self._guard(self._kv.watch(self.key), "watch")
        except BaseException:
            await self.close()
            raise
        self._watch_task = asyncio.create_task(self._watch(watcher), name=f"nats watch {self.key}")

    async def _bucket(self, nc: Client) -> KeyValue:
        self._js = js = nc.jetstream(timeout=self.request_timeout)
        missing = (nats.js.errors.BucketNotFoundError,)
        try:
            kv = await self._guard(js.key_value(self.bucket), "open bucket", passthrough=missing)
        except nats.js.errors.BucketNotFoundError:
            try:
                kv = await self._guard(
                    js.create_key_value(bucket=self.bucket, ttl=self.ttl, history=1),
                    "create bucket",
                    passthrough=(nats.js.errors.BadRequestError,),
                )
                log.info("created NATS KV bucket %s with TTL %gs", self.bucket, self.ttl)
            except nats.js.errors.BadRequestError as exc:
                # Another agent created it at the same moment, maybe with another TTL.
                try:
                    kv = await self._guard(
                        js.key_value(self.bucket), "open bucket", passthrough=missing
                    )
                except nats.js.errors.BucketNotFoundError:
                    raise Misconfigured(
                        f"cannot create NATS KV bucket {self.bucket!r}: {exc.description}"
                    ) from None
        status = await self._guard(kv.status(), "read bucket status")
        if not status.ttl or abs(status.ttl - self.ttl) > 0.001:
            have = f"{status.ttl:g}s" if status.ttl else "no TTL"
            raise Misconfigured(
                f"NATS KV bucket {self.bucket!r} has {have} but election {self.election!r} has "
                f"ttl {self.ttl:g}s; the bucket's TTL bounds failover, so they must agree: set "
                f"ttl = {status.ttl or 0:g}s, use another bucket, or recreate this one"
            )
        return kv

    async def _watch(self, watcher: KeyValue.KeyWatcher) -> None:
        """Wake followers on every change of the key, and revoke the leader's lease when the
        key is no longer its own; resubscribe when the watch breaks."""
        while True:
            try:
                async for entry in watcher:
                    if entry is not None:
                        self._takeover.saw(entry.revision)
                        self._guard_own_seat(entry)
                    self._changed.set()
                return  # stopped by close()
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(watcher.stop(), 1)
                raise
            except Exception as exc:
                log.debug("watch on %s broke: %s", self.key, exc)
            self._changed.set()
            while True:
                await asyncio.sleep(self.retry_interval)
                try:
                    watcher = await self._guard(self._require_kv().watch(self.key), "watch")
                    break
                except (Unavailable, nats.errors.Error) as exc:
                    log.debug("watch on %s: %s", self.key, exc)

    async def close(self) -> None:
        task, self._watch_task = self._watch_task, None
        await cancelled(task)
        nc, self._nc, self._js, self._kv = self._nc, None, None, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 2)

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = str(exc) or type(exc).__name__
        log.debug("NATS %s: %s", self.options.url, self._last_error)

    async def _on_disconnected(self) -> None:
        log.info("election %s: disconnected from NATS", self.election)

    async def _on_reconnected(self) -> None:
        log.info("election %s: reconnected to NATS", self.election)
        self._changed.set()

    # -- the election ----------------------------------------------------------------------

    async def campaign(self) -> Lease | None:
        if not self._splayed:
            self._splayed = True
            await asyncio.sleep(random.uniform(0, self.options.splay))
        kv = self._require_kv()
        self._changed.clear()
        entry = await self._read_any(kv)
        last = 0  # no message at all: absent, or aged out TTL after its last write
        if entry is not None and entry.operation not in _MARKERS:
            adopted = await self._adopt_own_key(kv, entry)
            if adopted is None:
                return None
            rev, sent = adopted
        else:
            if entry is not None:
                value = _decode(entry.value)
                resigned = entry.operation == "DEL" and value.get("resigned") is True
                at = self._takeover.claim_at(resigned=resigned)
                how = "purged" if entry.operation == "PURGE" else "deleted"
                if self._takeover.waits(at, self.election, f"key {self.key} was {how}"):
                    return None
                last = entry.revision or 0
            self._takeover.pending_until = None
            sent = time.monotonic()
            try:
                # Conditioned on what was read: a newer write means another holder.
                rev = await self._guard(kv.update(self.key, self._value(None), last=last), "create")
            except nats.js.errors.KeyWrongLastSequenceError:
                adopted = await self._adopt_own_key(kv)
                if adopted is None:
                    return None
                rev, sent = adopted
        self._term, self._rev = rev, rev
        self._revocation = revocation = Revocation()
        if self.options.won_after_renew:
            # Choria's grace period: an old leader gets one renew interval to notice first.
            await asyncio.sleep(self.renew_interval)
            try:
                return await self.renew(Lease(rev, sent + self.ttl, revocation))
            except Lost:
                return None
        return Lease(rev, sent + self.ttl, revocation)

    async def _adopt_own_key(
        self, kv: KeyValue, entry: KeyValue.Entry | None = None
    ) -> tuple[int, float] | None:
        """The key exists: when it is ours (a write whose answer was lost), start a new term.

        Returns the new term's revision and when the proving update was sent."""
        if entry is None:
            entry = await self._read(kv)
        if entry is None or _decode(entry.value).get("nonce") != self._nonce:
            return None
        sent = time.monotonic()
        try:
            rev = await self._guard(
                kv.update(self.key, self._value(None), last=entry.revision), "adopt"
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            return None
        return rev, sent

    async def renew(self, lease: Lease) -> Lease:
        """Extend the lease; retry transport failures while the lease lasts.

        The runner would only try again a whole renew interval later, which with TTL/3 renewals
        can be after the lease ran out: a single timed-out renewal would then demote a healthy
        leader. Retrying here keeps a short blip from costing the seat; a CAS failure still
        raises Lost at once, and the runner's own deadline still bounds the whole call.
        """
        while True:
            try:
                return await self._renew_once(lease)
            except Unavailable as exc:
                if time.monotonic() + RETRY_PAUSE >= lease.expires - RETRY_PAUSE:
                    raise
                log.info("election %s: %s; retrying within the lease", self.election, exc)
                await asyncio.sleep(RETRY_PAUSE)

    async def _renew_once(self, lease: Lease) -> Lease:
        if self._term is None or lease.token != self._term:
            raise Lost(f"term {lease.token} is no longer ours")
        kv = self._require_kv()
        sent = time.monotonic()
        try:
            rev = await self._guard(
                kv.update(self.key, self._value(self._term), last=self._rev), "renew"
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            entry = await self._read(kv)
            if entry is None:
                self._forget()
                raise Lost("the key was deleted or aged out") from None
            if not self._ours(entry):
                self._forget()
                holder = _decode(entry.value).get("agent") or "another agent"
                raise Lost(f"{holder} wrote the key (revision {entry.revision})") from None
            # An earlier renewal of ours landed after its answer was lost: carry on from it.
            sent = time.monotonic()
            try:
                rev = await self._guard(
                    kv.update(self.key, self._value(self._term), last=entry.revision), "renew"
                )
            except nats.js.errors.KeyWrongLastSequenceError:
                self._forget()
                raise Lost("another agent wrote the key") from None
        self._rev = rev
        return Lease(self._term, sent + self.ttl, self._revocation)

    async def resign(self, lease: Lease) -> None:
        if self._term is None or lease.token != self._term:
            return
        kv = self._require_kv()
        last = self._rev
        self._forget()
        try:
            await self._delete(kv, last)
        except _WrongLast:
            entry = await self._read(kv)
            if entry is not None and self._ours(entry, lease.token):
                with contextlib.suppress(_WrongLast):
                    await self._delete(kv, entry.revision)

    async def observe(self) -> Seat:
        self._changed.clear()
        entry = await self._read(self._require_kv())
        if entry is None:
            return Seat(None, None)
        value = _decode(entry.value)
        token = value.get("token")
        return Seat(value.get("agent"), token if isinstance(token, int) else entry.revision)

    async def wait_for_change(self, timeout: float) -> None:
        timeout = min(timeout, self.retry_interval)
        pending = self._takeover.pending_until
        if pending is not None:
            timeout = min(timeout, max(0.0, pending - time.monotonic()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    # -- helpers ----------------------------------------------------------------------------

    def _value(self, token: int | None) -> bytes:
        return json.dumps(
            {
                "agent": self.agent_id,
                "election": self.election,
                "token": token,
                "nonce": self._nonce,
            },
            separators=(",", ":"),
        ).encode()

    def _ours(self, entry: KeyValue.Entry, term: int | None = None) -> bool:
        """True when the entry was written by this backend instance in our current term."""
        value = _decode(entry.value)
        token = value.get("token")
        token = token if isinstance(token, int) else entry.revision
        return value.get("nonce") == self._nonce and token == (term or self._term)

    def _forget(self) -> None:
        self._term = self._rev = None
        self._revocation = None

    def _guard_own_seat(self, entry: KeyValue.Entry) -> None:
        """Revoke the lease the moment the watch shows the key is no longer ours."""
        revocation, rev = self._revocation, self._rev
        if revocation is None or rev is None or (entry.revision or 0) <= rev:
            return
        if entry.operation in _MARKERS:
            why = f"the key was {'purged' if entry.operation == 'PURGE' else 'deleted'}"
        elif self._ours(entry):
            return  # a renewal of ours, seen before its answer
        else:
            why = f"{_decode(entry.value).get('agent') or 'another agent'} wrote the key"
        log.info("election %s: %s (revision %s); standing down", self.election, why, entry.revision)
        revocation.revoke(f"{why} (revision {entry.revision})")

    def _require_kv(self) -> KeyValue:
        if self._kv is None or self._nc is None or self._nc.is_closed:
            raise Unavailable("not connected to NATS")
        return self._kv

    async def _read(self, kv: KeyValue) -> KeyValue.Entry | None:
        """The key's live entry; None when absent, deleted or purged."""
        entry = await self._read_any(kv)
        return None if entry is None or entry.operation in _MARKERS else entry

    async def _read_any(self, kv: KeyValue) -> KeyValue.Entry | None:
        """The key's last message, a delete or purge marker included (``operation`` says
        which); None when there is none (never written, or aged out)."""
        try:
            entry = await self._guard(
                kv.get(self.key), "read", passthrough=(nats.js.errors.KeyNotFoundError,)
            )
        except nats.js.errors.KeyNotFoundError as exc:
            if exc.entry is None:
                return None
            entry = dataclasses.replace(exc.entry, operation=exc.op)
        self._takeover.saw(entry.revision)
        return entry

    async def _delete(self, kv: KeyValue, last: int | None) -> None:
        """A delete marker conditioned on ``last``, marked as a resign (see the docstring)."""
        js = self._js
        if js is None:
            raise Unavailable("not connected to NATS")
        headers = {_KV_OP: "DEL"}
        if last:
            headers[_EXPECTED_LAST] = str(last)
        body = json.dumps({"agent": self.agent_id, "resigned": True}).encode()
        # The subject of a key in a bucket without a JetStream domain (ADR-8).
        publish = js.publish(f"$KV.{self.bucket}.{self.key}", body, headers=headers)
        try:
            await self._guard(publish, "resign")
        except nats.js.errors.APIError as exc:
            if exc.err_code in _WRONG_LAST:
                raise _WrongLast from None
            raise

    async def _guard(
        self, call: Any, what: str, *, passthrough: tuple[type[Exception], ...] = ()
    ) -> Any:
        """Await ``call`` (bounded), turning transport trouble into Unavailable."""
        with self._unavailable(what, passthrough):
            # A KV call may take a few requests (create retries over a delete marker).
            return await asyncio.wait_for(call, 3 * self.request_timeout + 0.5)

    @contextlib.contextmanager
    def _unavailable(self, what: str, passthrough: tuple[type[Exception], ...]) -> Iterator[None]:
        try:
            yield
        except (nats.js.errors.KeyWrongLastSequenceError, *passthrough):
            raise
        except nats.js.errors.BadBucketError:
            raise Misconfigured(f"{self.bucket!r} is not a NATS KV bucket") from None
        except nats.js.errors.APIError as exc:
            if exc.err_code in _WRONG_LAST:
                raise
            # Anything else (no stream, server busy, ...) may pass: retry within the lease.
            raise unavailable(what, f"NATS answered {exc.code}: {exc.description}") from None
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            raise unavailable(what, exc) from None


class _WrongLast(Exception):
    """A conditional delete found another revision than ours."""


def _decode(raw: bytes | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        value = None
    if isinstance(value, dict):
        return value
    # Not ours (e.g. choria stores the bare name): show it as the leader.
    return {"agent": raw.decode("utf-8", "replace").strip() or None}
