"""The etcd backend against a real etcd 3.4: PD-style lease + transaction, watch, fencing."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aetcd
import pytest

from agent.backends.etcd import EtcdBackend, EtcdOptions
from agent.config import ElectionConfig, build_config
from agent.runner import ElectionRunner
from tests.backends import setup_etcd
from tests.backends.scenarios import stop_all, successive_terms, the_leader
from tests.helpers import eventually, free_port, refused_options


def host_port(url: str) -> tuple[str, int]:
    host, _, port = url.split("://", 1)[1].rpartition(":")
    return host, int(port)


@pytest.fixture
def election() -> str:
    return f"test/etcd-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def etcd(etcd_url: str, election: str) -> AsyncIterator[aetcd.Client]:
    """An outside client, to look at and meddle with the election; cleans the key up."""
    host, port = host_port(etcd_url)
    client = aetcd.Client(host=host, port=port, timeout=5)
    yield client
    await client.delete_prefix(f"/electorate-test/{election}".encode())
    await client.close()


def key_of(election: str) -> bytes:
    return f"/electorate-test/{election}".encode()


def make_runner(
    etcd_url: str, election: str, agent_id: str, *, ttl: float = 2.0, **kwargs: Any
) -> ElectionRunner:
    options = EtcdOptions.model_validate(setup_etcd.options(etcd_url, election, 0, 1))
    config = ElectionConfig(
        name=election, backend="etcd", ttl=ttl, labels={}, observer=False, options=options
    )
    return ElectionRunner(config, agent_id, hold_off=kwargs.pop("hold_off", 1.0), **kwargs)


async def test_one_leader_and_etcdctl_names_it(
    etcd_url: str, election: str, etcd: aetcd.Client
) -> None:
    runners = [make_runner(etcd_url, election, f"agent-{i}") for i in range(3)]
    for r in runners:
        await r.start()
    try:
        leader = await eventually(lambda: the_leader(runners))
        await eventually(lambda: all(r.leader == leader.agent_id for r in runners))
        out = await setup_etcd.etcdctl(
            etcd_url, "get", key_of(election).decode(), "--print-value-only"
        )
        assert json.loads(out)["agent"] == leader.agent_id
        # The token is the key's create revision, and stays the same while renewing.
        kv = await etcd.get(key_of(election))
        assert leader.token == kv.create_revision
        await asyncio.sleep(1.0)  # a few keep-alives (TTL/3)
        assert leader.is_leader() and leader.token == kv.create_revision
    finally:
        await stop_all(*runners)
    assert await etcd.get(key_of(election)) is None, "stopping the leader resigns"


async def test_revoked_lease_is_lost_promptly(
    etcd_url: str, election: str, etcd: aetcd.Client
) -> None:
    lost: list[tuple[str, float, bool]] = []

    def on_lost(_name: str, why: str) -> None:
        lost.append((why, time.monotonic(), runner.is_leader()))

    runner = make_runner(etcd_url, election, "solo", on_lost=on_lost)
    await runner.start()
    try:
        await eventually(runner.is_leader)
        first = runner.token
        lease_id = runner.backend._lease_id
        assert lease_id is not None
        revoked = time.monotonic()
        await etcd.revoke_lease(lease_id)
        await eventually(lambda: lost, timeout=2)
        why, at, leading = lost[0]
        assert why == "lost" and not leading
        # Within one renew interval (TTL/3) plus a little, not at the end of the lease.
        assert at - revoked < runner.backend.renew_interval + 0.3
        # The seat is empty now, so it wins again, in a new term, once its old lease (which it
        # waits out like any follower) has surely run out.
        await eventually(lambda: runner.is_leader() and runner.token > first, timeout=4)
    finally:
        await runner.stop()


async def test_key_rewritten_by_another_is_lost(
    etcd_url: str, election: str, etcd: aetcd.Client
) -> None:
    reasons: list[str] = []
    runner = make_runner(etcd_url, election, "solo", on_lost=lambda _n, why: reasons.append(why))
    await runner.start()
    try:
        await eventually(runner.is_leader)
        await etcd.put(key_of(election), b'{"agent": "intruder"}')  # no lease: not ours any more
        await eventually(lambda: reasons, timeout=2)
        assert reasons == ["lost"]
        assert not runner.is_leader()
        await eventually(lambda: runner.leader == "intruder", timeout=3)
    finally:
        await runner.stop()


async def test_watch_shows_a_resign_to_a_follower_at_once(
    etcd_url: str, election: str, etcd: aetcd.Client
) -> None:
    # A 9 s TTL: polling would take up to 3 s (TTL/3); only the watch makes this fast.
    a = make_runner(etcd_url, election, "a", ttl=9.0)
    b = make_runner(etcd_url, election, "b", ttl=9.0)
    await a.start()
    try:
        await eventually(a.is_leader)
        await b.start()
        await eventually(lambda: b.state == "follower" and b.leader == "a")
        await asyncio.sleep(0.3)  # b is parked in its watch now
        started = time.monotonic()
        result = await a.step_down(hold_off=5.0)
        assert result.ok, result.detail
        await eventually(b.is_leader, timeout=1)
        took = time.monotonic() - started
        assert took < 0.5, f"the follower took {took:.2f}s to see the resign"
    finally:
        await stop_all(a, b)


async def test_token_grows_across_terms(etcd_url: str, election: str, etcd: aetcd.Client) -> None:
    runners = [make_runner(etcd_url, election, name) for name in ("a", "b")]
    try:
        terms = await successive_terms(runners, 3, hold_off=1.0)
        for token, result in terms:
            assert result.ok, result.detail
            assert result.token is not None and result.token > token
        tokens = [token for token, _ in terms]
        assert tokens == sorted(set(tokens)), tokens
    finally:
        await stop_all(*runners)


async def test_cut_off_leader_fences_itself_before_another_wins(
    etcd_url: str, election: str, etcd: aetcd.Client
) -> None:
    runners = [make_runner(etcd_url, election, name) for name in ("a", "b", "c")]
    for r in runners:
        await r.start()
    try:
        old = await eventually(lambda: the_leader(runners))
        reasons: list[str] = []
        old.on_lost = lambda _n, why: reasons.append(why)
        await setup_etcd.cut_off(old, etcd_url)
        others = [r for r in runners if r is not old]
        new = None
        deadline = time.monotonic() + 10
        while new is None:  # watch every step: the old leader must be out first
            new = next((r for r in others if r.is_leader()), None)
            if new is not None:
                assert not old.is_leader()
            await asyncio.sleep(0.005)
            assert time.monotonic() < deadline, "nobody took over"
        assert reasons == ["expired"]
        assert new.token > old.token
    finally:
        await stop_all(*runners)


async def test_a_revoked_leader_stops_claiming_at_once(
    etcd_url: str, election: str, etcd: aetcd.Client
) -> None:
    # A 9 s TTL: the next keep-alive is up to 3 s away; only the leader's own watch is fast.
    runner = make_runner(etcd_url, election, "solo", ttl=9.0)
    await runner.start()
    try:
        await eventually(runner.is_leader)
        await asyncio.sleep(0.2)  # past the first keep-alive: the watch alone must tell
        revoked = time.monotonic()
        await etcd.revoke_lease(runner.backend._lease_id)
        await eventually(lambda: not runner.is_leader(), timeout=5, interval=0.005)
        took = time.monotonic() - revoked
        assert took < 0.2, f"still claimed the seat {took:.2f}s after its lease was revoked"
    finally:
        await runner.stop()


async def test_a_follower_waits_out_a_holder_that_did_not_resign(
    etcd_url: str, election: str, etcd: aetcd.Client
) -> None:
    ttl = 3.0
    a = make_runner(etcd_url, election, "a", ttl=ttl)
    b = make_runner(etcd_url, election, "b", ttl=ttl)
    await a.start()
    try:
        await eventually(a.is_leader)
        await b.start()
        await eventually(lambda: b.leader == "a")
        await asyncio.sleep(0.3)  # b is parked in its watch
        revoked = time.monotonic()
        await etcd.revoke_lease(a.backend._lease_id)
        await eventually(lambda: not a.is_leader(), timeout=2, interval=0.005)
        # b saw a's last renewal at most TTL/3 before the revoke: a's lease may run up to
        # TTL after that renewal, so nobody may lead again before 2/3 TTL (minus slack).
        while not b.is_leader() and not a.is_leader():
            assert time.monotonic() - revoked < ttl + 2, "nobody took the seat over"
            await asyncio.sleep(0.005)
        took = time.monotonic() - revoked
        assert took > 2 * ttl / 3 - 0.1, f"led again {took:.2f}s after the revoke"
        assert not (a.is_leader() and b.is_leader())
    finally:
        await stop_all(a, b)


async def test_an_agent_starting_beside_an_unresigned_record_waits_a_ttl(
    etcd_url: str, election: str, etcd: aetcd.Client
) -> None:
    # The seat is empty, but the record says its last holder did not resign: that holder may
    # still believe in its lease (cut off from etcd while someone deleted its key).
    record = {"agent": "gone", "lease": "1", "ttl": 2.0, "state": "leading"}
    await etcd.put(key_of(election) + b"\0holder", json.dumps(record).encode())
    runner = make_runner(etcd_url, election, "a")
    started = time.monotonic()
    await runner.start()
    try:
        await eventually(runner.is_leader, timeout=5)
        assert time.monotonic() - started > 1.9
    finally:
        await runner.stop()
    # It resigned on the way out: the next agent to start leads at once.
    fresh = make_runner(etcd_url, election, "b")
    started = time.monotonic()
    await fresh.start()
    try:
        await eventually(fresh.is_leader, timeout=5, interval=0.005)
        assert time.monotonic() - started < 0.5
    finally:
        await fresh.stop()


async def test_restarted_agent_waits_for_its_old_lease(
    etcd_url: str, election: str, etcd: aetcd.Client
) -> None:
    # A previous incarnation of "a" left its key (and record) behind with a lease nobody keeps
    # alive.
    old_lease = await etcd.lease(2)
    await etcd.put(key_of(election), json.dumps({"agent": "a"}).encode(), lease=old_lease)
    record = {"agent": "a", "lease": f"{old_lease.id:x}", "ttl": 2.0, "state": "leading"}
    await etcd.put(key_of(election) + b"\0holder", json.dumps(record).encode())
    old = await etcd.get(key_of(election))
    runner = make_runner(etcd_url, election, "a")
    started = time.monotonic()
    await runner.start()
    try:
        await asyncio.sleep(0.5)
        assert not runner.is_leader() and runner.state == "candidate"
        await eventually(runner.is_leader, timeout=5)
        assert time.monotonic() - started > 1.0  # only once etcd expired the old lease
        assert runner.token > old.create_revision
    finally:
        await runner.stop()


async def test_a_dead_endpoint_is_skipped(etcd_url: str, election: str, etcd: aetcd.Client) -> None:
    options = EtcdOptions(
        endpoints=[f"http://127.0.0.1:{free_port()}", etcd_url], key=key_of(election).decode()
    )
    config = ElectionConfig(
        name=election, backend="etcd", ttl=2.0, labels={}, observer=False, options=options
    )
    runner = ElectionRunner(config, "a")
    await runner.start()
    try:
        await eventually(runner.is_leader, timeout=5)
    finally:
        await runner.stop()


def test_default_key() -> None:
    backend = EtcdBackend(
        election="db/main", agent_id="a", ttl=2, options=EtcdOptions(endpoints=["h:2379"])
    )
    assert backend.key == b"/electorate/db/main"


@pytest.mark.parametrize(
    ("options", "field", "message"),
    [
        ({}, "endpoints", "required option is missing"),
        ({"endpoints": []}, "endpoints", "at least one endpoint"),
        ({"endpoints": ["https://etcd:2379"]}, "endpoints", "TLS"),
        ({"endpoints": ["http://etcd:notaport"]}, "endpoints", "port"),
        ({"endpoints": ["ftp://etcd:2379"]}, "endpoints", "http://HOST:PORT"),
        ({"endpoints": "http://etcd:2379"}, "endpoints", "list"),
        ({"endpoints": ["http://etcd:2379"], "key": " "}, "key", "empty"),
        ({"endpoints": ["http://etcd:2379"], "lease": 3}, "lease", "unknown option"),
    ],
)
def test_bad_options(tmp_path: Path, options: dict[str, Any], field: str, message: str) -> None:
    error = refused_options(tmp_path, "etcd", "2s", options)
    assert error.field.startswith(f"election[0] (db).{field}"), error.field
    assert message in error.message, error.message


def test_good_options(tmp_path: Path) -> None:
    raw = {
        "election": [
            {"name": "db", "backend": "etcd", "endpoints": ["10.0.0.1:2379", "http://e2:2379"]}
        ]
    }
    [config] = build_config(raw, tmp_path / "agent.toml").elections
    assert config.options.endpoints == ["10.0.0.1:2379", "http://e2:2379"]
