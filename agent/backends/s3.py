"""Leader election on one S3 object per election (s3lect's design, with its flaws fixed).

The seat is the object ``key`` in ``bucket``; its JSON body holds ``holder`` (an agent id, or
null for a vacant seat), ``term``, ``expiry`` and ``renewed_at`` (both from the *writer's*
clock, for humans only) and a ``nonce`` that makes every write's ETag unique.

- Take an empty seat (no object yet) with ``PUT If-None-Match: *``; take a vacant or expired
  seat, and renew, with ``PUT If-Match: <etag>``. Exactly one conditional write on one ETag
  can succeed, so two candidates never both win.
- Staleness does NOT use the writer's clock. A reader decides that a seat has expired when it
  has seen the *same ETag* for longer than ``leader_timeout`` on its *own* monotonic clock,
  counted from the moment it first received that ETag. A leader's lease runs from the moment
  it *sent* its last successful write plus ``leader_timeout``. Every reader first receives an
  ETag after the write that made it, hence after it was sent; so the leader's lease always
  runs out (and the runner demotes it) before any reader can call the seat expired, whatever
  the clocks of the machines say. Clock *rates* are assumed to agree, as for any lease.
- A leader that cannot renew demotes itself when its lease runs out (s3lect's leader, cut off
  from S3, never did). A 412 PreconditionFailed or a 404 on renew means someone else wrote or
  removed the seat: lost. A 409 ConditionalRequestConflict (a concurrent conditional write) is
  retried; a campaign that meets one simply did not win.
- A seat object deleted behind the leader's back (``aws s3 rm``) is not taken at once with
  ``If-None-Match: *``: the leader learns of it only at its next renewal (a 404) and claims
  the seat until then. An agent that has seen the object since it started takes a missing one
  only ``leader_timeout`` after it first found it missing (``Takeover``, the staleness rule
  above with the deletion as the last write seen); an agent that never saw it takes it at once.
- A restarted agent that finds its own id in the object does not take that as a win (s3lect
  could skip ``OnAcquire`` so): the seat is someone's seat like any other, and is taken with a
  fresh conditional write in a new term once it has gone stale, or at once if it was resigned.
- Resign writes the seat back vacant (``holder: null``, same term) with ``If-Match``, so the
  term survives and the next winner's term is larger. Fencing token: the term.
- Followers poll: every ``frequent_interval`` while no healthy leader is known (and while
  leading: renewals), every ``infrequent_interval`` while one is, and right when the seat they
  watch would go stale. A crashed leader is replaced between ``leader_timeout`` and
  ``leader_timeout + infrequent_interval`` after its last renewal.

Cluster and shard elections live side by side: each election has its own key (default
``electorate/<election>.json``), any number of them in one bucket. The bucket is created when
missing. Every call goes through boto3 in a worker thread, with short timeouts and no retries
(the runner retries within what is left of the lease). Elections of one agent process share
one boto3 client per endpoint, region, credentials and timeouts (``SharedClients``): a client
is thread-safe once made and costs some 10 MB (its own session and service model), so one per
election made an agent with 100 of them weigh over a gigabyte.

Checked against moto 5.2 (the test server): it honours ``If-None-Match: *`` (412 when the key
exists) and ``If-Match`` (412 on another ETag, 404 NoSuchKey when the key is missing) on
PutObject, and returns quoted MD5 ETags. It never answers 409, and its check-then-store is not
under a lock; 8 concurrent ``If-Match`` writers x 300 rounds and 4 concurrent
``If-None-Match`` writers x 200 rounds never produced two winners there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

import boto3
import botocore.exceptions
import urllib3.exceptions
from botocore.config import Config
from pydantic import field_validator

from agent.backends.base import Backend, BackendOptions, Lease, Seat, Takeover, Text
from agent.backends.errors import Lost, Misconfigured, Unavailable, unavailable
from agent.durations import Duration

log = logging.getLogger(__name__)

T = TypeVar("T")

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
#: Connections one shared client keeps: as many as the default executor runs calls at once.
POOL = min(32, (os.cpu_count() or 1) + 4)


class SharedClients:
    """boto3 clients shared by the elections of this process, counted so the last one out
    closes it. A client is thread-safe once made; a boto3 session is not, so clients are made
    one at a time under the lock (each from a session of its own)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[Hashable, tuple[Any, int]] = {}

    def acquire(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The client for ``key``, made with ``make()`` the first time (blocking: call it in a
        worker thread)."""
        with self._lock:
            client, users = self._clients.get(key) or (make(), 0)
            self._clients[key] = (client, users + 1)
            return client

    def release(self, key: Hashable) -> Any | None:
        """One user fewer; the client to close when that was the last one."""
        with self._lock:
            client, users = self._clients.pop(key)
            if users > 1:
                self._clients[key] = (client, users - 1)
                return None
            return client


CLIENTS = SharedClients()


class S3Options(BackendOptions):
    #: S3 endpoint URL (MinIO, moto, ...); leave out for AWS itself.
    endpoint: str | None = None
    bucket: str
    #: The seat object; default ``electorate/<election>.json``.
    key: Text | None = None
    region: Text = "us-east-1"
    #: A seat unchanged this long (on the reader's clock) is expired. Default: the TTL.
    leader_timeout: Duration | None = None
    #: Renew (leading) and poll (campaigning) this often. Default: leader_timeout / 4.
    frequent_interval: Duration | None = None
    #: Poll this often while a healthy leader is known. Default: leader_timeout / 2.
    infrequent_interval: Duration | None = None
    access_key: str | None = None
    secret_key: str | None = None

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            url = urlsplit(value)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ValueError(f"expected an http(s):// URL, got {value!r}")
        return value

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        if not _BUCKET.match(value) or ".." in value:
            raise ValueError(
                f"{value!r} is not a valid bucket name (3-63 lowercase letters, digits, "
                "dots and hyphens, starting and ending with a letter or digit)"
            )
        return value


@dataclass(frozen=True)
class Timing:
    leader_timeout: float
    frequent: float
    infrequent: float


def timing(options: S3Options, ttl: float) -> Timing:
    lt = options.leader_timeout if options.leader_timeout is not None else ttl
    frequent = options.frequent_interval if options.frequent_interval is not None else lt / 4
    infrequent = options.infrequent_interval
    if infrequent is None:
        infrequent = max(lt / 2, frequent)
    return Timing(lt, frequent, infrequent)


@dataclass(frozen=True)
class Snapshot:
    """One read of the seat: ``etag`` None when the object does not exist."""

    etag: str | None
    holder: str | None
    term: int
    nonce: str | None
    received: float


class _Refused(Exception):
    """S3 answered with an error status (not a transport failure)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code


def refusal(exc: botocore.exceptions.ClientError) -> _Refused:
    error = exc.response.get("Error", {})
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    code = str(error.get("Code") or status)
    return _Refused(status, code, str(error.get("Message") or ""))


#: What a refused conditional PUT means: "lost" (someone else has the seat now), "conflict"
#: (a concurrent conditional write; try again), "gone" (If-Match on a missing object).
def classify(refused: _Refused) -> str:
    if refused.status == 412 or refused.code == "PreconditionFailed":
        return "lost"
    if refused.status == 409 or refused.code == "ConditionalRequestConflict":
        return "conflict"
    if refused.status == 404 or refused.code in ("NoSuchKey", "NotFound"):
        return "gone"
    return "error"


class S3Backend(Backend, name="s3", options=S3Options):
    @classmethod
    def check_options(cls, options: S3Options, ttl: float) -> tuple[str, str] | None:
        t = timing(options, ttl)
        if t.leader_timeout <= 0:
            return "leader_timeout", "must be more than 0"
        if t.frequent <= 0:
            return "frequent_interval", "must be more than 0"
        if t.frequent * 2 > t.leader_timeout:
            return (
                "frequent_interval",
                "must be at most half of leader_timeout, so that a leader can retry a renewal "
                "before it has to demote itself",
            )
        if t.infrequent < t.frequent:
            return "infrequent_interval", "cannot be shorter than frequent_interval"
        if (options.access_key is None) != (options.secret_key is None):
            return "secret_key", "access_key and secret_key go together"
        return None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        opts: S3Options = self.options
        self.bucket = opts.bucket
        self.key = opts.key or f"electorate/{self.election}.json"
        self.timing = timing(opts, self.ttl)
        self._client: Any = None
        #: The key of the shared client this election holds (released on close).
        self._client_key: Hashable | None = None
        #: The ETag of our last write while we hold the seat.
        self._etag: str | None = None
        #: Writes whose outcome we never learned (timeout): nonce -> (term, sent).
        self._pending: dict[str, tuple[int, float]] = {}
        #: Staleness on our own clock: the ETag we see (None: no object) and when we first
        #: received it.
        self._takeover = Takeover(self.timing.leader_timeout)
        #: Did the last read show a holder that is not stale?
        self._healthy = False
        self._max_term = 0
        #: The read a failed campaign made, handed to the observe() that follows it.
        self._fresh: Snapshot | None = None

    # -- timing -----------------------------------------------------------------------------

    @property
    def renew_interval(self) -> float:
        return self.timing.frequent

    @property
    def retry_interval(self) -> float:
        """Frequent while no healthy leader is known; else infrequent, but wake up right when
        the seat would go stale."""
        if not self._healthy:
            # Wake right when a deleted seat may be taken, if that comes first.
            pending = self._takeover.pending_until
            if pending is not None and pending > time.monotonic():
                return max(0.02, min(self.timing.frequent, pending - time.monotonic() + 0.02))
            return self.timing.frequent
        until_stale = self._takeover.claim_at() - time.monotonic()
        return max(0.02, min(self.timing.infrequent, until_stale + 0.02))

    # -- S3 calls ---------------------------------------------------------------------------

    def _client_settings(self, endpoint: str | None) -> tuple[Any, ...]:
        """What a client is made of: (endpoint, region, access key, secret, connect timeout,
        read timeout); elections that agree on all of it share one client."""
        opts: S3Options = self.options
        access, secret = opts.access_key, opts.secret_key
        if endpoint and access is None:
            # moto and most test servers take any key; real AWS uses boto3's usual chain.
            access = os.environ.get("AWS_ACCESS_KEY_ID", "test")
            secret = os.environ.get("AWS_SECRET_ACCESS_KEY", "test")
        connect_timeout = max(0.5, min(2.0, self.timing.frequent))
        read_timeout = max(1.0, min(5.0, self.timing.leader_timeout / 2))
        return (endpoint, opts.region, access, secret, connect_timeout, read_timeout)

    def _make_client(self, endpoint: str | None) -> Any:
        endpoint, region, access, secret, connect_timeout, read_timeout = self._client_settings(
            endpoint
        )
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": 1, "mode": "standard"},
            s3={"addressing_style": "path"} if endpoint else None,
            max_pool_connections=POOL,
        )
        session = boto3.session.Session()
        return session.client(
            "s3",
            endpoint_url=endpoint,
            region_name=region,
            aws_access_key_id=access,
            aws_secret_access_key=secret,
            config=config,
        )

    def _shared_client(self) -> Any:
        key = self._client_settings(self.options.endpoint)
        client = CLIENTS.acquire(key, lambda: self._make_client(self.options.endpoint))
        self._client_key = key
        return client

    async def _s3(self, call: Callable[..., T], **kwargs: Any) -> T:
        """Run one boto3 call in a thread: _Refused on an S3 error, Unavailable otherwise."""
        try:
            return await asyncio.to_thread(call, **kwargs)
        except botocore.exceptions.ClientError as exc:
            raise refusal(exc) from None
        except (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise unavailable("S3", exc) from None

    def _body(self, holder: str | None, term: int, nonce: str) -> bytes:
        now = datetime.now(UTC)
        return json.dumps(
            {
                "holder": holder,
                "term": term,
                "expiry": (now + timedelta(seconds=self.timing.leader_timeout)).isoformat(),
                "renewed_at": now.isoformat(),
                "election": self.election,
                "nonce": nonce,
            }
        ).encode()

    def _get(self) -> tuple[str, bytes]:
        response = self._client.get_object(Bucket=self.bucket, Key=self.key)
        with contextlib.closing(response["Body"]) as body:
            return response["ETag"], body.read()

    async def _read(self) -> Snapshot:
        try:
            etag, body = await self._s3(self._get)
        except Unavailable:
            self._healthy = False  # nothing known: poll often until S3 answers again
            raise
        except _Refused as exc:
            if classify(exc) != "gone":
                self._healthy = False
                raise unavailable("S3 read", exc) from None
            snap = Snapshot(None, None, self._max_term, None, time.monotonic())
        else:
            # Received now: the write behind this ETag was sent before this moment.
            received = time.monotonic()
            holder, term, nonce = self._parse(body)
            snap = Snapshot(etag, holder, term, nonce, received)
        self._takeover.saw(snap.etag, at=snap.received)
        if snap.etag is not None:
            self._takeover.pending_until = None
        self._max_term = max(self._max_term, snap.term)
        self._healthy = snap.holder is not None and not self._stale(snap)
        return snap

    def _parse(self, body: bytes) -> tuple[str | None, int, str | None]:
        try:
            data = json.loads(body)
            holder = data["holder"]
            term = int(data["term"])
            nonce = data.get("nonce")
            return (None if holder is None else str(holder)), term, nonce
        except (ValueError, KeyError, TypeError):
            # Not ours to read: someone's seat all the same, taken over once it goes stale.
            log.warning(
                "election %s: s3://%s/%s is not a seat", self.election, self.bucket, self.key
            )
            return "?", self._max_term, None

    def _stale(self, snap: Snapshot) -> bool:
        return snap.etag is not None and time.monotonic() > self._takeover.claim_at()

    async def _put(self, term: int, holder: str | None, **condition: str) -> tuple[str, float]:
        """One conditional PUT; returns (etag, sent). Unknown outcomes stay in _pending."""
        nonce = secrets.token_hex(8)
        sent = time.monotonic()
        self._pending[nonce] = (term, sent)
        self._fresh = None
        try:
            response = await self._s3(
                self._client.put_object,
                Bucket=self.bucket,
                Key=self.key,
                Body=self._body(holder, term, nonce),
                ContentType="application/json",
                **condition,
            )
        except _Refused:
            self._pending.pop(nonce, None)  # refused: certainly not applied
            raise
        self._pending.clear()  # this write is the newest: older unknown ones do not matter
        return response["ETag"], sent

    def _ours(self, snap: Snapshot) -> tuple[int, float] | None:
        """Our own write whose answer we missed, if that is what the seat holds now."""
        if snap.holder == self.agent_id and snap.nonce in self._pending:
            return self._pending[snap.nonce]
        return None

    def _won(self, etag: str, term: int, sent: float) -> Lease:
        self._etag = etag
        self._pending.clear()
        self._max_term = max(self._max_term, term)
        self._healthy = True
        self._takeover.saw(etag)
        return Lease(token=term, expires=sent + self.timing.leader_timeout)

    # -- the interface ----------------------------------------------------------------------

    async def open(self) -> None:
        if self._client is None:
            self._client = await asyncio.to_thread(self._shared_client)
        try:
            await self._s3(self._client.head_bucket, Bucket=self.bucket)
            return
        except _Refused as exc:
            if exc.status in (401, 403):
                raise Misconfigured(f"S3 denies access to bucket {self.bucket!r}: {exc}") from None
            if exc.status != 404:
                raise unavailable("S3 bucket check", exc) from None
        extra: dict[str, Any] = {}
        if self.options.region != "us-east-1":
            extra["CreateBucketConfiguration"] = {"LocationConstraint": self.options.region}
        try:
            await self._s3(self._client.create_bucket, Bucket=self.bucket, **extra)
            log.info("election %s: created bucket %s", self.election, self.bucket)
        except _Refused as exc:
            if exc.code == "BucketAlreadyOwnedByYou":
                return  # another agent created it first
            if exc.status in (401, 403) or exc.code == "BucketAlreadyExists":
                raise Misconfigured(f"cannot create bucket {self.bucket!r}: {exc}") from None
            raise unavailable("S3 create bucket", exc) from None

    async def campaign(self) -> Lease | None:
        snap = await self._read()
        mine = self._ours(snap)
        if mine is not None and snap.etag is not None:
            # A write of ours went through although we never heard back: it proves the seat
            # from the moment it was sent.
            term, sent = mine
            return self._won(snap.etag, term, sent)
        if snap.etag is None:
            gone = f"s3://{self.bucket}/{self.key} was deleted"
            if self._takeover.waits(self._takeover.claim_at(), self.election, gone):
                self._fresh = snap
                return None
            condition = {"IfNoneMatch": "*"}
        elif snap.holder is None or self._stale(snap):
            condition = {"IfMatch": snap.etag}
        else:
            self._fresh = snap
            return None
        self._takeover.pending_until = None
        term = max(self._max_term, snap.term) + 1
        try:
            etag, sent = await self._put(term, self.agent_id, **condition)
        except _Refused as exc:
            if classify(exc) in ("lost", "conflict", "gone"):
                return None  # another candidate wrote first (or is writing): not ours
            raise unavailable("S3 campaign", exc) from None
        log.debug("election %s: took the seat in term %d", self.election, term)
        return self._won(etag, term, sent)

    async def renew(self, lease: Lease) -> Lease:
        if self._etag is None:
            raise Lost("this agent holds no seat")
        try:
            etag, sent = await self._put(lease.token, self.agent_id, IfMatch=self._etag)
        except _Refused as exc:
            kind = classify(exc)
            if kind == "conflict":
                raise unavailable("S3 renew", exc) from None
            if kind == "gone":
                self._etag = None
                raise Lost("the seat object was deleted") from None
            if kind != "lost":
                raise unavailable("S3 renew", exc) from None
            return await self._recover(lease)
        self._etag = etag
        return Lease(token=lease.token, expires=sent + self.timing.leader_timeout)

    async def _recover(self, lease: Lease) -> Lease:
        """After a 412: is the seat's ETag one of our own writes whose answer we missed?"""
        snap = await self._read()
        mine = self._ours(snap)
        if mine is not None and snap.etag is not None and mine[0] == lease.token:
            self._etag = snap.etag
            self._pending.clear()
            return Lease(token=lease.token, expires=mine[1] + self.timing.leader_timeout)
        self._etag = None
        raise Lost(f"the seat was rewritten by {snap.holder or 'nobody'} (412 on renew)")

    async def resign(self, lease: Lease) -> None:
        etag, self._etag = self._etag, None
        if etag is None:
            return
        try:
            await self._put(lease.token, None, IfMatch=etag)
        except _Refused as exc:
            if classify(exc) != "lost":
                raise unavailable("S3 resign", exc) from None
            snap = await self._read()  # maybe a renewal of ours landed unseen
            if self._ours(snap) is not None and snap.etag is not None:
                await self._put(lease.token, None, IfMatch=snap.etag)
        finally:
            self._healthy = False
            self._pending.clear()

    async def observe(self) -> Seat:
        snap, self._fresh = self._fresh, None
        if snap is None or time.monotonic() - snap.received > 0.1:
            snap = await self._read()
        if snap.holder is None or self._stale(snap):
            return Seat(None, snap.term or None)
        return Seat(snap.holder, snap.term)

    async def close(self) -> None:
        client, self._client = self._client, None
        key, self._client_key = self._client_key, None
        # In a thread: the lock may be held while another election makes a client.
        shared = await asyncio.to_thread(CLIENTS.release, key) if key is not None else None
        if shared is not None:
            await asyncio.to_thread(shared.close)
        if client is not None and key is None:
            await asyncio.to_thread(client.close)  # a client of its own (never shared)
