"""The NATS KV backend against the real server: choria's election with its flaws fixed.

Pinned here: the bucket is created with the TTL and a disagreeing bucket refuses to start;
a voluntary resign is seen by a watching follower at once; the fencing token is exposed, stable
per term and grows across terms; a compare-and-set failure is a loss at once while a transport
blip shorter than the lease is not; an outage longer than the lease demotes the leader before
its key ages out; an aged-out key is noticed by polling; bad options fail at load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest
from nats.js.kv import KeyValue

from agent.backends.base import Lease, Seat
from agent.backends.errors import Lost, Misconfigured, Unavailable
from agent.backends.nats import NatsBackend, NatsOptions, election_key
from agent.config import ConfigError, ElectionConfig, build_config
from agent.runner import ElectionRunner, Transition
from tests.backends.scenarios import a_leads_b, stop_all, the_leader
from tests.helpers import campaign_won, eventually, free_port, opened

# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
async def bucket(nats_url: str) -> AsyncIterator[str]:
    """A bucket name of its own; deleted afterwards."""
    name = f"electorate-test-{uuid.uuid4().hex[:12]}"
    yield name
    nc = await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=0)
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await nc.jetstream(timeout=2).delete_key_value(name)
    await nc.close()


@pytest.fixture
async def admin(nats_url: str) -> AsyncIterator[nats.js.JetStreamContext]:
    """A connection of the test's own, to look at and meddle with the bucket."""
    nc = await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=0)
    yield nc.jetstream(timeout=2)
    await nc.close()


def backend(url: str, bucket: str, agent: str, *, ttl: float = 2.0, **opts: Any) -> NatsBackend:
    options = NatsOptions.model_validate({"url": url, "bucket": bucket, "splay": 0, **opts})
    return NatsBackend(election="svc/nats", agent_id=agent, ttl=ttl, options=options)


@pytest.fixture
async def pair(nats_url: str, bucket: str) -> AsyncIterator[tuple[NatsBackend, NatsBackend]]:
    """Agents a and b on the test's bucket, open."""
    a, b = backend(nats_url, bucket, "a"), backend(nats_url, bucket, "b")
    async with opened(a, b):
        yield a, b


class Recorder:
    """Keeps a runner's transitions with the monotonic time they happened."""

    def __init__(self) -> None:
        self.transitions: list[tuple[float, Transition]] = []

    def __call__(self, transition: Transition) -> None:
        self.transitions.append((time.monotonic(), transition))

    def times(self, to: str) -> list[float]:
        return [t for t, tr in self.transitions if tr.to == to]

    def reasons(self) -> list[str | None]:
        return [tr.reason for _, tr in self.transitions if tr.from_ == "leader"]


def runner(
    url: str, bucket: str, agent: str, *, ttl: float = 2.0, election: str = "svc/nats", **opts: Any
) -> tuple[ElectionRunner, Recorder]:
    options = NatsOptions.model_validate({"url": url, "bucket": bucket, "splay": 0, **opts})
    config = ElectionConfig(
        name=election, backend="nats", ttl=ttl, labels={}, observer=False, options=options
    )
    recorder = Recorder()
    return ElectionRunner(config, agent, hold_off=1.0, on_transition=recorder), recorder


async def watch_single_leader(runners: list[ElectionRunner], seen: list[str]) -> None:
    """Fail the test the moment two runners claim the seat; note who led."""
    while True:
        current = the_leader(runners)
        if current and (not seen or seen[-1] != current.agent_id):
            seen.append(current.agent_id)
        await asyncio.sleep(0.005)


class PausableProxy:
    """A TCP proxy in front of NATS that can stop carrying bytes, as a network blip does.

    While paused, the bytes already sent are held (as TCP would retransmit them) and delivered
    on resume; new connections are accepted but carry nothing.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"nats://127.0.0.1:{port}"

    def pause(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    async def close(self) -> None:
        if self.server:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await self.flowing.wait()
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            dst.close()


@pytest.fixture
async def proxy(nats_url: str) -> AsyncIterator[PausableProxy]:
    host, _, port = nats_url.split("://", 1)[-1].rpartition(":")
    p = PausableProxy((host or "127.0.0.1", int(port)))
    yield p
    p.resume()
    await p.close()


async def leader_and_follower(
    url: str, bucket: str, ttl: float
) -> tuple[ElectionRunner, ElectionRunner]:
    """Runners a, leading, and b, following it."""
    a, _ = runner(url, bucket, "a", ttl=ttl)
    b, _ = runner(url, bucket, "b", ttl=ttl)
    await a_leads_b(a, b)
    return a, b


Pair = tuple[tuple[ElectionRunner, Recorder], tuple[ElectionRunner, Recorder]]


@pytest.fixture
async def behind_proxy(nats_url: str, bucket: str, proxy: PausableProxy) -> AsyncIterator[Pair]:
    """Runner a, reaching NATS through the proxy, leads; runner b, connected directly, follows.
    Both stop, with the link healed, when the test ends."""
    url = await proxy.start()
    a, rec_a = runner(url, bucket, "a", ttl=2.0)
    b, rec_b = runner(nats_url, bucket, "b", ttl=2.0)
    await a_leads_b(a, b)
    yield (a, rec_a), (b, rec_b)
    proxy.resume()
    await stop_all(a, b)


async def after_a_renewal(r: ElectionRunner, timeout: float = 5.0) -> None:
    """Return right after the runner's lease was extended (to time a blip against it)."""
    left = r.ttl_left() or 0.0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now_left = r.ttl_left() or 0.0
        if now_left > left + 0.2:
            return
        left = now_left
        await asyncio.sleep(0.002)
    raise AssertionError("no renewal seen")


async def kv_of(admin: nats.js.JetStreamContext, bucket: str) -> KeyValue:
    return await admin.key_value(bucket)


# -- options ----------------------------------------------------------------------------------


def load(tmp_path: Path, ttl: str = "3s", **options: Any) -> Any:
    raw = {"election": [{"name": "svc/a", "backend": "nats", "ttl": ttl, **options}]}
    return build_config(raw, tmp_path / "agent.toml")


def test_options_defaults_and_key_mapping(tmp_path: Path) -> None:
    config = load(tmp_path, url="nats://127.0.0.1:4222")
    opts = config.elections[0].options
    assert (opts.bucket, opts.key, opts.splay, opts.won_after_renew) == (
        "electorate",
        None,
        0.25,
        False,
    )
    b = NatsBackend(election="svc/a", agent_id="x", ttl=3.0, options=opts)
    assert b.key == "svc.a"
    assert b.renew_interval == pytest.approx(1.0)  # TTL/3, so a 3s TTL works
    assert b.retry_interval == pytest.approx(1.0)

    assert election_key("orders/db-primary") == "orders.db-primary"
    names = ["a/b", "a.b", "a_b", "a:b", "a//b", "a/", "a..b", "A-b_c"]
    keys = [election_key(n) for n in names]
    assert len(set(keys)) == len(names), keys  # no two elections share a key
    for key in keys:  # every key is a valid NATS KV key
        NatsOptions.model_validate({"url": "nats://h:1", "key": key})
    assert election_key("a.b") == "a=2Eb"
    assert election_key("x:y") == "x=3Ay"

    config = load(
        tmp_path,
        url="nats://a:4222, nats://b:4222",
        bucket="elections",
        key="custom.key",
        renew_interval="500ms",
        splay="0s",
        won_after_renew=True,
    )
    opts = config.elections[0].options
    assert (opts.key, opts.renew_interval, opts.won_after_renew) == ("custom.key", 0.5, True)


@pytest.mark.parametrize(
    ("options", "ttl", "field", "message"),
    [
        ({"url": None}, "3s", "url", "required option is missing"),
        ({"url": "http://127.0.0.1:4222"}, "3s", "url", "nats://HOST:PORT"),
        ({"bucket": "my.bucket"}, "3s", "bucket", "letters, digits"),
        ({"key": "a..b"}, "3s", "key", "may not start or end"),
        ({"key": ".a"}, "3s", "key", "may not start or end"),
        ({"renew_interval": "3s"}, "3s", "renew_interval", "below the ttl"),
        ({"renew_interval": "0s"}, "3s", "renew_interval", "above 0"),
        ({"splay": "5s"}, "3s", "splay", "below the ttl"),
        ({}, "500ms", "ttl", "at least 1s"),
        ({"max_age": "3s"}, "3s", "max_age", "unknown option"),
        ({"won_after_renew": "maybe"}, "3s", "won_after_renew", "bool"),
    ],
)
def test_bad_options_fail_at_load(
    tmp_path: Path, options: dict[str, Any], ttl: str, field: str, message: str
) -> None:
    options = {"url": "nats://127.0.0.1:4222", **options}
    if options["url"] is None:
        del options["url"]
    with pytest.raises(ConfigError) as err:
        load(tmp_path, ttl=ttl, **options)
    assert err.value.field == f"election[0] (svc/a).{field}"
    assert message in err.value.message


# -- bucket -----------------------------------------------------------------------------------


async def test_bucket_is_created_with_the_ttl_and_a_disagreeing_one_refuses_to_start(
    nats_url: str, bucket: str, admin: nats.js.JetStreamContext
) -> None:
    first = backend(nats_url, bucket, "a", ttl=2.0)
    async with opened(first):
        status = await (await kv_of(admin, bucket)).status()
        assert status.ttl == pytest.approx(2.0)
        assert status.history == 1
        same = backend(nats_url, bucket, "b", ttl=2.0)
        await same.open()  # an existing bucket with the same TTL is fine
        await same.close()

        other = backend(nats_url, bucket, "c", ttl=3.0)
        with pytest.raises(Misconfigured, match=r"has 2s but election 'svc/nats' has ttl 3s"):
            await other.open()
        assert other._nc is None  # it let go of its connection

        # Through the runner: the election stops with the reason and never campaigns.
        r, rec = runner(nats_url, bucket, "c", ttl=3.0)
        await r.start()
        await eventually(lambda: r.error, timeout=5)
        assert "has 2s" in (r.error or "")
        await asyncio.sleep(0.3)
        assert not r.is_leader() and rec.times("leader") == []
        await r.stop()


async def test_agents_racing_to_create_the_bucket_agree_or_refuse(
    nats_url: str, bucket: str
) -> None:
    two, three = backend(nats_url, bucket, "a", ttl=2.0), backend(nats_url, bucket, "b", ttl=3.0)
    results = await asyncio.gather(two.open(), three.open(), return_exceptions=True)
    try:
        assert sorted(type(r).__name__ for r in results) == ["Misconfigured", "NoneType"]
    finally:
        await two.close()
        await three.close()


async def test_a_bucket_without_ttl_refuses_to_start(
    nats_url: str, bucket: str, admin: nats.js.JetStreamContext
) -> None:
    await admin.create_key_value(bucket=bucket, history=1)
    b = backend(nats_url, bucket, "a", ttl=2.0)
    with pytest.raises(Misconfigured, match="has no TTL"):
        await b.open()


async def test_an_unreachable_server_is_unavailable_not_a_hang() -> None:
    b = backend(f"nats://127.0.0.1:{free_port()}", "electorate", "a", ttl=2.0)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="cannot connect"):
        await b.open()
    assert time.monotonic() - started < 3
    await b.close()


# -- the mechanism, one call at a time --------------------------------------------------------


async def test_campaign_renew_resign_and_a_token_per_term(
    pair: tuple[NatsBackend, NatsBackend], bucket: str, admin: nats.js.JetStreamContext
) -> None:
    a, b = pair
    before = time.monotonic()
    lease = await campaign_won(a)
    assert before + 2.0 <= lease.expires <= time.monotonic() + 2.0  # from the send time
    term = lease.token
    assert await b.campaign() is None
    assert await b.observe() == Seat("a", term)

    entry = await (await kv_of(admin, bucket)).get("svc.nats")
    assert json.loads(entry.value)["agent"] == "a"  # `nats kv get` names the leader
    for _ in range(3):
        before = time.monotonic()
        renewed = await a.renew(lease)
        assert renewed.token == term  # one token per term, though the revision moves
        assert renewed.expires >= before + 2.0
        lease = renewed
    assert await b.observe() == Seat("a", term)
    assert (await (await kv_of(admin, bucket)).get("svc.nats")).revision > term

    await a.resign(lease)
    assert await b.observe() == Seat(None, None)
    with pytest.raises(Lost):
        await a.renew(lease)
    lease_b = await b.campaign()
    assert lease_b is not None and lease_b.token > term  # the fencing token grows
    assert await a.observe() == Seat("b", lease_b.token)


async def test_a_cas_failure_is_lost_and_a_transport_error_is_unavailable(
    nats_url: str, bucket: str, admin: nats.js.JetStreamContext
) -> None:
    a = backend(nats_url, bucket, "a")
    async with opened(a):
        lease = await campaign_won(a)
        kv = await kv_of(admin, bucket)
        await kv.put("svc.nats", b"choria-host")  # someone else wrote the key
        assert await a.observe() == Seat("choria-host", (await kv.get("svc.nats")).revision)
        with pytest.raises(Lost, match="choria-host"):
            await a.renew(lease)

        await kv.purge("svc.nats")
        # Purged, not resigned: choria-host may lead for a TTL yet (2 s here), so a waits.
        purged = time.monotonic()
        while (lease := await a.campaign()) is None:
            assert time.monotonic() < purged + 3.0, "never claimed the purged key"
            await asyncio.sleep(0.05)
        assert time.monotonic() - purged > 1.5
        await a._nc.close()  # the connection is gone: leadership unknown, not lost
        with pytest.raises(Unavailable):  # after retrying for what is left of the lease
            await a.renew(Lease(lease.token, time.monotonic() + 0.5))


async def test_a_key_deleted_under_its_leader_revokes_its_lease_and_is_claimed_after_it(
    pair: tuple[NatsBackend, NatsBackend], bucket: str, admin: nats.js.JetStreamContext
) -> None:
    a, b = pair
    lease = await campaign_won(a)
    await (await kv_of(admin, bucket)).delete("svc.nats")  # `nats kv del`, behind a's back
    await eventually(lambda: lease.revoked, timeout=1)  # a's own watch saw it
    won = None
    while won is None:
        assert time.monotonic() < lease.expires + 1.0, "never claimed"
        won = await b.campaign()
        await asyncio.sleep(0.02)
    assert time.monotonic() >= lease.expires  # not before a's lease could have run out
    assert won.token > lease.token
    # A resign's delete marker is told apart from that one: taken over at once.
    await b.resign(won)
    again = await a.campaign()
    assert again is not None and again.token > won.token


async def test_a_write_whose_answer_was_lost_is_adopted_not_reported_lost(
    pair: tuple[NatsBackend, NatsBackend], bucket: str, admin: nats.js.JetStreamContext
) -> None:
    a, b = pair
    lease = await campaign_won(a)
    kv = await kv_of(admin, bucket)
    # A renewal that reached the server although its answer timed out.
    await kv.update("svc.nats", a._value(lease.token), last=a._rev)
    renewed = await a.renew(lease)
    assert renewed.token == lease.token
    # A create whose answer was lost: the next campaign takes the seat back, as a new term.
    a._forget()
    again = await a.campaign()
    assert again is not None and again.token > lease.token
    assert await b.observe() == Seat("a", again.token)
    # Another agent's key is never adopted.
    assert await b.campaign() is None


async def test_won_after_renew_reports_the_win_after_the_first_renewal(
    nats_url: str, bucket: str
) -> None:
    a = backend(nats_url, bucket, "a", won_after_renew=True, renew_interval="300ms")
    b = backend(nats_url, bucket, "b")
    async with opened(a, b):
        started = time.monotonic()
        task = asyncio.create_task(a.campaign())
        await asyncio.sleep(0.1)
        seat = await b.observe()
        assert seat.leader == "a"  # the key is taken at once...
        lease = await task
        assert time.monotonic() - started >= 0.3  # ...the win is reported a renewal later
        assert isinstance(lease, Lease) and lease.token == seat.token
        assert lease.expires > started + 0.3 + 2.0


# -- the runner on NATS -----------------------------------------------------------------------


async def test_resign_is_seen_by_a_watching_follower_at_once_with_a_3s_ttl(
    nats_url: str, bucket: str
) -> None:
    a, b = await leader_and_follower(nats_url, bucket, ttl=3.0)
    old = a.token
    try:
        started = time.monotonic()
        result = await a.step_down(hold_off=2.0)
        took = time.monotonic() - started
        assert result.ok, result.detail
        # Polling runs every TTL/3 = 1s: only the watch makes this fast.
        assert took < 0.5, took
        assert b.is_leader() and b.token > old
        assert not a.is_leader() and a.leader in (None, "b")
    finally:
        await stop_all(a, b)


async def test_an_aged_out_key_is_found_by_polling_after_a_kill(nats_url: str, bucket: str) -> None:
    a, b = await leader_and_follower(nats_url, bucket, ttl=2.0)
    old = a.token
    try:
        killed = time.monotonic()
        await a.stop(resign=False)  # as if killed: the key stays until it ages out
        await eventually(b.is_leader, timeout=5)
        took = time.monotonic() - killed
        # No watch event for an aged-out key: found by the TTL/3 poll, within TTL + a poll.
        assert 1.2 < took < 2.0 + 2.0 / 3 + 0.5, took
        assert b.token > old
    finally:
        await stop_all(a, b)


async def test_a_cas_failure_demotes_at_once_as_lost(
    nats_url: str, bucket: str, admin: nats.js.JetStreamContext
) -> None:
    a, rec = runner(nats_url, bucket, "a", ttl=3.0)
    await a.start()
    try:
        await eventually(a.is_leader, timeout=5)
        kv = await kv_of(admin, bucket)
        entry = await kv.get("svc.nats")
        taken = time.monotonic()
        await kv.update("svc.nats", b'{"agent": "intruder"}', last=entry.revision)
        await eventually(lambda: not a.is_leader(), timeout=3)
        # At once by its own watch, at the latest at the next renewal (TTL/3): long before the
        # 3s lease would have run out. The runner reports it as soon as it wakes.
        assert time.monotonic() - taken < 1.0 + 0.3
        await eventually(rec.reasons, timeout=1)
        assert rec.reasons() == ["lost"]
        await eventually(lambda: a.leader == "intruder", timeout=2)
    finally:
        await a.stop()


async def test_a_blip_shorter_than_the_lease_does_not_demote(
    behind_proxy: Pair, proxy: PausableProxy
) -> None:
    (a, rec_a), (_, rec_b) = behind_proxy
    token = a.token
    lowest = 2.0
    await after_a_renewal(a)
    proxy.pause()  # the renewal due in 0.67s times out (0.5s) and is retried
    deadline = time.monotonic() + 1.3
    while time.monotonic() < deadline:
        assert a.is_leader()
        lowest = min(lowest, a.ttl_left() or 0.0)
        await asyncio.sleep(0.005)
    proxy.resume()
    await after_a_renewal(a)  # renewing again through the healed link
    assert lowest < 0.8, "the blip should have held renewals up"
    assert a.is_leader() and a.token == token
    assert rec_a.reasons() == [] and rec_b.times("leader") == []
    await asyncio.sleep(1.0)
    assert a.is_leader() and a.token == token


async def test_an_outage_longer_than_the_lease_demotes_before_the_key_ages_out(
    behind_proxy: Pair, proxy: PausableProxy
) -> None:
    (a, rec_a), (b, rec_b) = behind_proxy
    seen: list[str] = []
    guard = asyncio.create_task(watch_single_leader([a, b], seen))
    try:
        await after_a_renewal(a)
        cut = time.monotonic()
        proxy.pause()
        await eventually(b.is_leader, timeout=6)
        demoted, won = rec_a.times("follower")[-1], rec_b.times("leader")[0]
        assert demoted < won, (demoted - cut, won - cut)
        assert demoted - cut < 2.0  # within the lease it last proved
        assert rec_a.reasons() == ["expired"]  # unknown, not lost: it ran out
        proxy.resume()  # the held renewals now land and must not revive the old term
        await eventually(lambda: a.leader == "b", timeout=5)
        await asyncio.sleep(1.0)
        assert b.is_leader() and not a.is_leader()
        assert seen == ["a", "b"]
        assert not guard.done()
    finally:
        guard.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await guard
