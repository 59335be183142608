"""The PostgreSQL backend against the real server: the whole-key holder check (bigint keys),
a terminated session lost at once, LISTEN/NOTIFY resigns, fencing tokens, the takeover grace
after a leader that did not resign, relinquish without a straight win-back, and a half-open
socket that cannot hang a leader."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from agent.backends.errors import Lost
from agent.backends.postgres import PostgresBackend, PostgresOptions, default_channel
from agent.config import ConfigError, ElectionConfig, build_config
from agent.runner import ElectionRunner
from tests.backends.scenarios import handover, stop_all, successive_terms
from tests.backends.setup_postgres import lock_id_for
from tests.backends.test_redis import TcpProxy
from tests.helpers import campaign_won, eventually

CHECK = 0.2
TTL = 1.0


@pytest.fixture
async def admin(pg_dsn: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    conn = await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True, connect_timeout=5)
    yield conn
    await conn.close()


@pytest.fixture
async def election(pg_dsn: str) -> AsyncIterator[str]:
    name = f"test-pg/{uuid.uuid4().hex[:12]}"
    yield name
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute("DELETE FROM electorate_fencing WHERE election = %s", [name])


def options(dsn: str, election: str, **extra: Any) -> PostgresOptions:
    raw = {"dsn": dsn, "lock_id": lock_id_for(election), "check_interval": CHECK, **extra}
    return PostgresOptions.model_validate(raw)


def backend(dsn: str, election: str, agent: str, ttl: float = TTL, **extra: Any) -> PostgresBackend:
    opts = options(dsn, election, **extra)
    return PostgresBackend(election=election, agent_id=agent, ttl=ttl, options=opts)


def runner(
    dsn: str, election: str, agent: str, ttl: float = TTL, *, hold_off: float = 1.0, **kw: Any
) -> ElectionRunner:
    extra = {k: kw.pop(k) for k in ("check_interval", "relinquish_interval") if k in kw}
    config = ElectionConfig(
        name=election,
        backend="postgres",
        ttl=ttl,
        labels={},
        observer=False,
        options=options(dsn, election, **extra),
    )
    return ElectionRunner(config, agent, hold_off=hold_off, flap_limit=0, **kw)


@pytest.mark.parametrize("high", [5, -3], ids=["bigint", "negative"])
async def test_holder_check_matches_the_whole_bigint_key_and_our_session(
    pg_dsn: str, election: str, admin: psycopg.AsyncConnection[Any], high: int
) -> None:
    low = 0x1234_5678
    key = (high << 32) | low
    twin = ((high + 2) << 32) | low  # another key with the same low 32 bits (objid)
    assert abs(key) > 2**32 and key != twin
    a = backend(pg_dsn, election, "a", lock_id=key)
    observer = backend(pg_dsn, election, "obs", lock_id=key)
    await a.open()
    await observer.open()
    try:
        lease = await campaign_won(a)
        await admin.execute("SELECT pg_advisory_lock(%s::int8)", [twin])
        lease = await a.renew(lease)  # the twin held elsewhere changes nothing
        # Our session drops its key; another session (and then ours too) holds the twin.
        assert a._conn is not None
        await a._conn.execute("SELECT pg_advisory_unlock(%s::int8)", [key])
        cur = await admin.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s::int8::oid",
            [low],
        )
        assert (await cur.fetchone()) == (1,)  # an objid-only check would see a holder
        with pytest.raises(Lost, match="no longer holds"):
            await a.renew(lease)
        assert (await observer.observe()).leader is None

        # Back in the seat (its own last term: no wait); now its own session takes the twin.
        await admin.execute("SELECT pg_advisory_unlock(%s::int8)", [twin])
        won = await a.campaign()
        assert won is not None and won.token == lease.token + 1
        await a._conn.execute("SELECT pg_advisory_lock(%s::int8)", [twin])
        await a._conn.execute("SELECT pg_advisory_unlock(%s::int8)", [key])
        with pytest.raises(Lost):  # objid and pid match, classid does not
            await a.renew(won)
    finally:
        await admin.execute("SELECT pg_advisory_unlock_all()")
        await a.close()
        await observer.close()


async def test_terminated_session_is_lost_at_once(
    pg_dsn: str, election: str, admin: psycopg.AsyncConnection[Any]
) -> None:
    lost: list[tuple[float, str | None]] = []
    a = runner(pg_dsn, election, "a", on_lost=lambda _, r: lost.append((time.monotonic(), r)))
    await a.start()
    try:
        await eventually(a.is_leader, timeout=5)
        pid = a.backend.session_pid  # type: ignore[attr-defined]
        killed_at = time.monotonic()
        await admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        await eventually(lambda: lost, timeout=3, interval=0.005)
        at, reason = lost[0]
        assert reason == "lost"
        assert at - killed_at < CHECK + 0.3, f"noticed {at - killed_at:.3f}s after the kill"
        # Its own previous term: it may take the seat straight back, with a new token.
        await eventually(a.is_leader, timeout=3)
    finally:
        await stop_all(a)


async def test_a_leader_that_did_not_resign_is_waited_out_before_another_leads(
    pg_dsn: str, election: str
) -> None:
    a, b = runner(pg_dsn, election, "a"), runner(pg_dsn, election, "b")
    watcher = backend(pg_dsn, election, "watcher")
    await a.start()
    await watcher.open()
    try:
        await eventually(a.is_leader, timeout=5)
        await b.start()
        await eventually(lambda: b.leader == "a", timeout=5)
        old_token = a.token
        assert old_token is not None
        old_expires = a._lease.expires if a._lease else 0.0
        crashed_at = time.monotonic()
        await a.stop(resign=False)  # the session ends, the fencing row still names "a"
        # Mid-grace b holds the lock, the row still names a: neither is reported as leader.
        await asyncio.sleep(TTL / 2)
        assert not b.is_leader()
        seat = await watcher.observe()
        assert seat.leader is None and seat.token == old_token, seat
        await eventually(b.is_leader, timeout=5, interval=0.005)
        waited = time.monotonic() - crashed_at
        assert b.token == old_token + 1
        # b won only after a's last lease had certainly run out.
        assert time.monotonic() > old_expires
        assert TTL - 0.05 < waited < TTL + CHECK + 0.5, waited
        assert (await watcher.observe()).leader == "b"
    finally:
        await watcher.close()
        await stop_all(a, b)


async def test_resign_is_seen_by_a_listening_follower_well_under_a_second(
    pg_dsn: str, election: str
) -> None:
    # A 2 s check interval: only the NOTIFY can explain a takeover within 0.3 s.
    slow = {"check_interval": 2.0}
    a = runner(pg_dsn, election, "a", ttl=5.0, **slow)
    b = runner(pg_dsn, election, "b", ttl=5.0, **slow)
    elapsed, result = await handover(a, b, hold_off=3)  # b waits on LISTEN
    assert result.ok
    assert elapsed < 0.3, f"follower took over {elapsed:.3f}s after the resign"


async def test_fencing_tokens_increase_with_every_leader(pg_dsn: str, election: str) -> None:
    runners = [runner(pg_dsn, election, f"n{i}") for i in range(3)]
    try:
        terms = await successive_terms(runners, 4, hold_off=1.5)
        assert all(result.ok for _, result in terms)
        tokens = [token for token, _ in terms]
        assert tokens == sorted(set(tokens)) and len(tokens) == 4, tokens
        assert tokens[-1] - tokens[0] == 3
    finally:
        await stop_all(*runners)


async def test_relinquish_hands_over_and_the_old_leader_does_not_win_straight_back(
    pg_dsn: str, election: str
) -> None:
    wins: list[tuple[str, int | None]] = []
    reasons: list[str] = []

    def track(agent: str) -> dict[str, Any]:
        return {
            "on_won": lambda _, token: wins.append((agent, token)),
            "on_transition": lambda t: t.reason and reasons.append(t.detail),
        }

    a = runner(pg_dsn, election, "a", relinquish_interval=0.6, **track("a"))
    b = runner(pg_dsn, election, "b", relinquish_interval=0.6, **track("b"))
    await a.start()
    try:
        await eventually(a.is_leader, timeout=5)
        await b.start()
        await eventually(lambda: len(wins) >= 4, timeout=10)
    finally:
        await stop_all(a, b)
    agents = [agent for agent, _ in wins]
    assert agents[:4] == ["a", "b", "a", "b"], wins
    tokens = [token for _, token in wins]
    assert tokens == sorted(set(tokens)), wins
    assert any("relinquished after 0.6s" in detail for detail in reasons), reasons


async def test_half_open_socket_cannot_hang_the_leader(
    pg_dsn: str, election: str, admin: psycopg.AsyncConnection[Any]
) -> None:
    info = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    proxy = await TcpProxy(str(info.get("host", "127.0.0.1")), int(info.get("port", 5432))).start()
    info.update(host="127.0.0.1", port=str(proxy.port))
    via_proxy = psycopg.conninfo.make_conninfo(**info)
    lost: list[tuple[float, str | None]] = []
    a = runner(via_proxy, election, "a", on_lost=lambda _, r: lost.append((time.monotonic(), r)))
    try:
        await a.start()
        await eventually(a.is_leader, timeout=5)
        cut_at = time.monotonic()
        proxy.blackhole()  # the session lives on behind the proxy: the lock stays taken
        await eventually(lambda: lost, timeout=3, interval=0.005)
        at, reason = lost[0]
        assert reason == "lost"
        # One check interval to the next check, then its deadline (0.5 s at least).
        assert at - cut_at < CHECK + 0.5 + 0.3, at - cut_at
        assert a.error is None or "unavailable" in a.error or "failed" in a.error
        started = time.monotonic()
        await a.stop()  # not stuck behind psycopg's cancel on a dead socket
        assert time.monotonic() - started < 2
    finally:
        await proxy.close()


async def test_channel_defaults_to_the_election_and_stays_a_valid_identifier() -> None:
    assert default_channel("svc/web") == "electorate:svc/web"
    long = default_channel("x" * 200)
    assert len(long.encode()) <= 63 and long != default_channel("y" * 200)


def test_bad_options_are_refused_naming_the_field(tmp_path: Path) -> None:
    def config(ttl: str = "3s", **options: Any) -> None:
        raw = {"election": [{"name": "svc", "backend": "postgres", "ttl": ttl, **options}]}
        build_config(raw, tmp_path / "agent.toml")

    dsn = "postgresql://postgres@127.0.0.1/postgres"
    with pytest.raises(ConfigError, match=r"election\[0\] \(svc\)\.dsn: required option"):
        config(lock_id=1)
    with pytest.raises(ConfigError, match=r"\.lock_id: required option"):
        config(dsn=dsn)
    with pytest.raises(ConfigError, match=r"\.dsn: .*not a valid PostgreSQL connection"):
        config(dsn="not a dsn", lock_id=1)
    with pytest.raises(ConfigError, match=r"\.lock_id: .*less than or equal"):
        config(dsn=dsn, lock_id=2**63)
    with pytest.raises(ConfigError, match=r"\.lock_id: .*valid integer"):
        config(dsn=dsn, lock_id="42")
    with pytest.raises(ConfigError, match=r"\.check_interval: must be at most half of ttl"):
        config(dsn=dsn, lock_id=1, check_interval="2s")
    with pytest.raises(ConfigError, match=r"\.notify_channel: .*must be 1 to 63 bytes"):
        config(dsn=dsn, lock_id=1, notify_channel="c" * 64)
    with pytest.raises(ConfigError, match=r"\.relinquish_cron: unknown option"):
        config(dsn=dsn, lock_id=1, relinquish_cron="0 * * * *")
    config(dsn=dsn, lock_id=-(2**63), check_interval="500ms", relinquish_interval=0)
