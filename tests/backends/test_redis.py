"""The Redis backend against the real server (db 14): compare-and-set renew, pub/sub resign,
atomic fencing tokens, and a leader that demotes before its key can expire when cut off."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from agent.backends.errors import Lost
from agent.backends.redis import RedisBackend, RedisOptions
from agent.config import ConfigError, ElectionConfig, build_config
from agent.runner import SAFETY_MARGIN, ElectionRunner
from tests.backends.scenarios import handover, stop_all, successive_terms
from tests.helpers import campaign_won, eventually, opened


class TcpProxy:
    """A TCP forwarder the test controls: ``blackhole()`` keeps every socket open but moves
    no more bytes either way (a half-open network), and holds new connections the same way."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.cut = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def blackhole(self) -> None:
        self.cut.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        if self.cut.is_set():
            return  # accepted, never answered
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.append(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while not self.cut.is_set():
                reader = asyncio.ensure_future(src.read(65536))
                cut = asyncio.ensure_future(self.cut.wait())
                await asyncio.wait({reader, cut}, return_when=asyncio.FIRST_COMPLETED)
                cut.cancel()
                if self.cut.is_set():
                    reader.cancel()
                    return  # drop it: nothing crosses a cut link
                data = reader.result()
                if not data:
                    dst.close()
                    return
                dst.write(data)
                await dst.drain()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)


@pytest.fixture
async def election(redis_url: str) -> AsyncIterator[str]:
    name = f"test-redis/{uuid.uuid4().hex[:12]}"
    yield name
    client = Redis.from_url(redis_url, socket_timeout=5)
    key = f"electorate:{name}"
    await client.delete(key, f"{key}:token", f"{key}:holder")
    await client.aclose()


@pytest.fixture
async def direct(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, socket_timeout=5, decode_responses=True)
    yield client
    await client.aclose()


def backend(url: str, election: str, agent: str, ttl: float = 1.0, **opts: Any) -> RedisBackend:
    options = RedisOptions.model_validate({"url": url, **opts})
    return RedisBackend(election=election, agent_id=agent, ttl=ttl, options=options)


@pytest.fixture
async def pair(redis_url: str, election: str) -> AsyncIterator[tuple[RedisBackend, RedisBackend]]:
    """Agents a and b on the test's election, open."""
    a, b = backend(redis_url, election, "a"), backend(redis_url, election, "b")
    async with opened(a, b):
        yield a, b


def runner(url: str, election: str, agent: str, ttl: float = 1.0, **kw: Any) -> ElectionRunner:
    options = RedisOptions.model_validate({"url": url})
    config = ElectionConfig(
        name=election, backend="redis", ttl=ttl, labels={}, observer=False, options=options
    )
    return ElectionRunner(config, agent, hold_off=1.0, **kw)


async def test_campaign_writes_a_readable_seat_and_an_atomic_token(
    pair: tuple[RedisBackend, RedisBackend], direct: Redis
) -> None:
    a, b = pair
    lease = await a.campaign()
    assert lease is not None and lease.token == 1
    assert await b.campaign() is None
    # A lost campaign spends no token.
    assert await direct.get(f"{a.key}:token") == "1"
    seat = json.loads(await direct.get(a.key))
    assert seat["agent"] == "a" and seat["token"] == 1 and seat["nonce"]
    ttl_ms = await direct.pttl(a.key)
    assert 0 < ttl_ms <= 1000
    # The lease ends no later than the key: from the send time, with the same TTL.
    assert lease.expires <= time.monotonic() + ttl_ms / 1000 + 0.05
    assert (await b.observe()).leader == "a"
    assert (await b.observe()).token == 1


async def test_renew_is_compare_and_set_and_fails_when_taken_over(
    redis_url: str, election: str, direct: Redis
) -> None:
    a = backend(redis_url, election, "a")
    async with opened(a):
        lease = await campaign_won(a)
        renewed = await a.renew(lease)
        assert renewed.expires > lease.expires
        # The key expired and someone else took it over in between.
        await direct.set(a.key, json.dumps({"agent": "b", "token": 9, "nonce": "x"}), px=5000)
        with pytest.raises(Lost, match="taken over"):
            await a.renew(renewed)
        assert json.loads(await direct.get(a.key))["agent"] == "b"  # untouched
        # Nor can it resign someone else's seat.
        await a.resign(renewed)
        assert json.loads(await direct.get(a.key))["agent"] == "b"
        # Expired: the record beside the seat expires with it.
        await direct.delete(a.key, a.record_key)
        second = await campaign_won(a)
        await direct.delete(a.key, a.record_key)  # expired
        with pytest.raises(Lost, match="expired"):
            await a.renew(second)


async def test_a_restarted_agent_with_the_same_id_does_not_adopt_the_old_seat(
    redis_url: str, election: str, direct: Redis
) -> None:
    old, new = backend(redis_url, election, "a"), backend(redis_url, election, "a")
    async with opened(old, new):
        lease = await campaign_won(old)
        assert await new.campaign() is None
        with pytest.raises(Lost):
            await new.renew(lease)
        # Once the new process wins (the old seat gone), the old one cannot renew: the nonce
        # in the value differs even though the agent id is the same.
        await direct.delete(old.key, old.record_key)
        won = await new.campaign()
        assert won is not None and won.token == lease.token + 1
        with pytest.raises(Lost):
            await old.renew(lease)
        await new.renew(won)


async def test_a_seat_deleted_under_its_leader_is_claimed_only_after_that_leaders_lease(
    pair: tuple[RedisBackend, RedisBackend], direct: Redis
) -> None:
    a, b = pair
    lease = await campaign_won(a)
    lease = await a.renew(lease)
    await direct.delete(a.key)  # behind a's back: a claims the seat until its lease ends
    assert await b.campaign() is None
    won = None
    while won is None:
        assert time.monotonic() < lease.expires + 1.0, "never claimed"
        await asyncio.sleep(0.01)
        won = await b.campaign()
    assert time.monotonic() >= lease.expires
    assert won.token > lease.token
    with pytest.raises(Lost):
        await a.renew(lease)
    # A resign clears the record with the seat: the next winner need not wait.
    await b.resign(won)
    assert await direct.exists(b.key, b.record_key) == 0
    assert await a.campaign() is not None


async def test_resign_is_seen_at_once_by_a_subscribed_follower(
    redis_url: str, election: str
) -> None:
    # TTL 6 s: a follower that only polled (every 2 s) could not win within 0.5 s.
    a, b = runner(redis_url, election, "a", ttl=6.0), runner(redis_url, election, "b", ttl=6.0)
    elapsed, result = await handover(a, b, hold_off=3)  # b waits on its subscription
    assert result.ok
    assert elapsed < 0.5, f"follower took over {elapsed:.3f}s after the resign"


async def test_fencing_token_increments_on_every_win(redis_url: str, election: str) -> None:
    runners = [runner(redis_url, election, f"n{i}") for i in range(3)]
    try:
        tokens = [token for token, _ in await successive_terms(runners, 4, hold_off=2)]
        assert tokens == sorted(set(tokens)) and len(tokens) == 4, tokens
        assert tokens[-1] - tokens[0] == 3  # one INCR per win, none for lost campaigns
    finally:
        await stop_all(*runners)


async def test_leader_demotes_before_its_key_can_expire_when_redis_is_unreachable(
    redis_url: str, election: str, direct: Redis
) -> None:
    host, port = "127.0.0.1", int(redis_url.split(":")[2].split("/")[0])
    proxy = await TcpProxy(host, port).start()
    reasons: list[str | None] = []
    ttl = 1.5

    def on_lost(name: str, reason: str | None) -> None:
        reasons.append(reason)

    old = runner(f"redis://127.0.0.1:{proxy.port}/14", election, "old", ttl=ttl, on_lost=on_lost)
    new = runner(redis_url, election, "new", ttl=ttl)
    await old.start()
    try:
        await eventually(old.is_leader, timeout=5)
        await new.start()
        await eventually(lambda: new.leader == "old", timeout=5)
        cut_at = time.monotonic()
        proxy.blackhole()
        await asyncio.sleep(0.05)  # whatever was in flight has landed; nothing more will
        sent = time.monotonic()
        key_expires = sent + await direct.pttl(f"electorate:{election}") / 1000  # a lower bound
        last_lease = old._lease
        while old._lease is not None:  # the last lease it held is the one that counts
            last_lease = old._lease
            await asyncio.sleep(0.005)
        assert last_lease is not None
        assert last_lease.expires - SAFETY_MARGIN < key_expires, (
            f"claimed leadership until {last_lease.expires - key_expires:+.3f}s past the "
            "key's expiry"
        )
        await eventually(lambda: reasons, timeout=5)
        assert reasons == ["expired"]
        assert time.monotonic() - cut_at < ttl + 0.5
        await eventually(new.is_leader, timeout=5, interval=0.005)
        assert not old.is_leader()
        assert new.token is not None and old.token is not None and new.token > old.token
    finally:
        await asyncio.gather(new.stop(), old.stop(resign=False))
        await proxy.close()


def test_bad_options_are_refused_naming_the_field(tmp_path: Path) -> None:
    def config(**options: Any) -> None:
        raw = {"election": [{"name": "svc", "backend": "redis", "ttl": "3s", **options}]}
        build_config(raw, tmp_path / "agent.toml")

    with pytest.raises(ConfigError, match=r"election\[0\] \(svc\)\.url: required option"):
        config()
    with pytest.raises(ConfigError, match=r"\.url: .*redis://"):
        config(url="http://127.0.0.1:6379")
    with pytest.raises(ConfigError, match=r"\.key: .*must not be empty"):
        config(url="redis://127.0.0.1", key=" ")
    with pytest.raises(ConfigError, match=r"\.lock_id: unknown option"):
        config(url="redis://127.0.0.1", lock_id=1)
    config(url="redis://127.0.0.1/14", key="my:seat", channel="my:seat:events")
