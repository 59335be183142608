"""The s3 backend against a real S3 server (moto): conditional writes, reader-clock staleness,
self-demotion, restarts, side-by-side elections."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from agent.backends.base import Seat
from agent.backends.errors import Lost
from agent.backends.s3 import CLIENTS, S3Backend, S3Options, classify, refusal
from agent.config import ElectionConfig
from agent.runner import ElectionRunner
from tests.backends import setup_s3
from tests.backends.scenarios import stop_all, successive_terms, the_leader
from tests.helpers import campaign_won, eventually, opened, refused_options

#: ttl 1 s: leader_timeout 1 s, frequent 250 ms, infrequent 500 ms.
TTL = 1.0


@pytest.fixture
def bucket(s3_url: str) -> Iterator[str]:
    name = f"electorate-test-{uuid.uuid4().hex[:16]}"
    yield name
    setup_s3.delete_bucket(s3_url, name)


@pytest.fixture
def s3(s3_url: str) -> Any:
    """An outside client, to look at and meddle with the seat."""
    return setup_s3.client(s3_url)


def election_name(prefix: str = "svc") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def election() -> str:
    """An election name of the test's own."""
    return election_name()


def make_runner(
    s3_url: str, bucket: str, election: str, agent_id: str, *, ttl: float = TTL, **kwargs: Any
) -> ElectionRunner:
    options = S3Options(endpoint=s3_url, bucket=bucket)
    config = ElectionConfig(
        name=election, backend="s3", ttl=ttl, labels={}, observer=False, options=options
    )
    return ElectionRunner(config, agent_id, hold_off=kwargs.pop("hold_off", 1.0), **kwargs)


def seat(s3: Any, bucket: str, election: str) -> tuple[str, dict[str, Any]]:
    response = s3.get_object(Bucket=bucket, Key=f"electorate/{election}.json")
    return response["ETag"], json.loads(response["Body"].read())


class Log:
    """Callbacks with monotonic timestamps."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, str, Any]] = []

    def hooks(self, agent: str) -> dict[str, Any]:
        return {
            "on_won": lambda _e, token: self.events.append((time.monotonic(), agent, "won", token)),
            "on_lost": lambda _e, why: self.events.append((time.monotonic(), agent, "lost", why)),
        }

    def of(self, agent: str, kind: str) -> list[tuple[float, Any]]:
        return [(at, x) for at, a, k, x in self.events if a == agent and k == kind]


Alone = tuple[ElectionRunner, Log, str]


@pytest.fixture
async def alone(s3_url: str, bucket: str, election: str) -> AsyncIterator[Alone]:
    """Agent a, alone in an election of its own, leading; what it logged; the election."""
    log = Log()
    runner = make_runner(s3_url, bucket, election, "a", **log.hooks("a"))
    await runner.start()
    try:
        await eventually(runner.is_leader)
        yield runner, log, election
    finally:
        await runner.stop()


async def test_one_leader_creates_the_bucket_and_writes_a_readable_seat(
    s3_url: str, bucket: str, election: str, s3: Any
) -> None:
    runners = [make_runner(s3_url, bucket, election, f"agent-{i}") for i in range(3)]
    for r in runners:
        await r.start()
    try:
        leader = await eventually(lambda: the_leader(runners))
        await eventually(lambda: all(r.leader == leader.agent_id for r in runners), timeout=3)
        s3.head_bucket(Bucket=bucket)  # created by the agents
        etag, body = seat(s3, bucket, election)
        assert body["holder"] == leader.agent_id
        assert body["term"] == leader.token
        assert {"expiry", "renewed_at"} <= set(body)
        await asyncio.sleep(0.6)  # renewals: a new ETag each time, the same term
        etag2, body2 = seat(s3, bucket, election)
        assert etag2 != etag and body2["term"] == leader.token and leader.is_leader()
    finally:
        await stop_all(*runners)
    _, body = seat(s3, bucket, election)
    assert body["holder"] is None, "stopping the leader vacates the seat"


async def test_cut_off_leader_demotes_before_leader_timeout_and_is_replaced_only_after(
    s3_url: str, bucket: str, election: str
) -> None:
    log = Log()
    a = make_runner(s3_url, bucket, election, "a", **log.hooks("a"))
    b = make_runner(s3_url, bucket, election, "b", **log.hooks("b"))
    await a.start()
    try:
        await eventually(a.is_leader)
        await b.start()
        await eventually(lambda: b.leader == "a")
        await asyncio.sleep(0.5)
        timeout = a.backend.timing.leader_timeout
        cutting = time.monotonic()
        await setup_s3.cut_off(a, s3_url)  # builds a client: a renewal may still go out meanwhile
        cut = time.monotonic()
        while not b.is_leader():
            assert not (a.is_leader() and b.is_leader())
            assert time.monotonic() - cut < 5, "b never took over"
            await asyncio.sleep(0.002)
        [(lost_at, why)] = log.of("a", "lost")
        [(won_at, token)] = log.of("b", "won")
        assert why == "expired"
        assert lost_at - cut < timeout, "the cut-off leader kept claiming the seat"
        assert won_at > lost_at
        # b had to see a's last ETag unchanged for leader_timeout on its own clock, and that
        # ETag was written at most one renew interval before the cut.
        assert won_at - cutting > timeout - a.backend.renew_interval - 0.05
        assert token == a.token + 1
    finally:
        await stop_all(b)
        await stop_all(a, resign=False)


async def test_someone_else_rewriting_the_seat_is_a_lost_412(
    alone: Alone, bucket: str, s3: Any
) -> None:
    runner, log, election = alone
    etag, body = seat(s3, bucket, election)
    intruder = {**body, "holder": "intruder", "term": body["term"] + 1, "nonce": "x"}
    written = time.monotonic()
    s3.put_object(
        Bucket=bucket,
        Key=f"electorate/{election}.json",
        Body=json.dumps(intruder).encode(),
        IfMatch=etag,
    )
    await eventually(lambda: log.of("a", "lost"), timeout=2)
    [(lost_at, why)] = log.of("a", "lost")
    assert why == "lost"
    assert lost_at - written < runner.backend.renew_interval + 0.3
    await eventually(lambda: runner.leader == "intruder", timeout=1)
    # The intruder never renews: a takes the seat back once it went stale, in a new term.
    await eventually(runner.is_leader, timeout=3)
    assert runner.token == body["term"] + 2


async def test_a_deleted_seat_is_lost_and_the_term_still_grows(
    alone: Alone, bucket: str, s3: Any
) -> None:
    runner, log, election = alone
    first = runner.token
    s3.delete_object(Bucket=bucket, Key=f"electorate/{election}.json")
    await eventually(lambda: log.of("a", "lost"), timeout=2)  # 404 on If-Match
    assert log.of("a", "lost")[0][1] == "lost"
    await eventually(lambda: runner.is_leader() and runner.token > first, timeout=3)


async def test_a_seat_deleted_under_its_leader_is_taken_only_after_that_leaders_lease(
    s3_url: str, bucket: str, election: str, s3: Any
) -> None:
    options = S3Options(endpoint=s3_url, bucket=bucket)
    a, b = (S3Backend(election=election, agent_id=n, ttl=TTL, options=options) for n in "ab")
    async with opened(a, b):
        lease = await campaign_won(a)
        assert await b.campaign() is None  # b has seen a's seat
        s3.delete_object(Bucket=bucket, Key=f"electorate/{election}.json")  # behind a's back
        won = None
        while won is None:
            assert time.monotonic() < lease.expires + 1.0, "never taken"
            won = await b.campaign()
            await asyncio.sleep(0.02)
        assert time.monotonic() >= lease.expires  # not while a could still claim it
        assert won.token > lease.token
        with pytest.raises(Lost):
            await a.renew(lease)


@pytest.mark.parametrize("writer_clock", ["expired long ago", "valid for an hour"])
async def test_restarted_agent_takes_its_old_seat_only_with_a_fresh_write(
    s3_url: str, bucket: str, election: str, s3: Any, writer_clock: str
) -> None:
    """s3lect skipped OnAcquire when it found its own id in the object after a restart. Ours
    treats that seat as anyone's: stale only after leader_timeout on the reader's own clock
    (whatever the writer's clock wrote), then taken in a new term with a conditional write."""
    s3.create_bucket(Bucket=bucket)
    delta = timedelta(hours=-1 if writer_clock == "expired long ago" else 1)
    old = {
        "holder": "a",
        "term": 5,
        "expiry": (datetime.now(UTC) + delta).isoformat(),
        "renewed_at": datetime.now(UTC).isoformat(),
    }
    old_etag = s3.put_object(
        Bucket=bucket, Key=f"electorate/{election}.json", Body=json.dumps(old).encode()
    )["ETag"]
    log = Log()
    runner = make_runner(s3_url, bucket, election, "a", **log.hooks("a"))
    started = time.monotonic()
    await runner.start()
    try:
        await asyncio.sleep(0.7)
        assert not runner.is_leader() and log.of("a", "won") == []
        assert runner.state == "candidate"  # its own stale seat: nobody it can prove
        await eventually(runner.is_leader, timeout=3)
        [(won_at, token)] = log.of("a", "won")
        assert won_at - started > runner.backend.timing.leader_timeout
        assert token == 6
        etag, body = seat(s3, bucket, election)
        assert etag != old_etag and body["holder"] == "a" and body["term"] == 6
    finally:
        await runner.stop()


async def test_resign_vacates_the_seat_and_keeps_the_term(
    s3_url: str, bucket: str, election: str, s3: Any
) -> None:
    runners = [make_runner(s3_url, bucket, election, name) for name in ("a", "b")]
    try:
        terms = await successive_terms(runners, 3, hold_off=2.0)
        for _, result in terms:
            assert result.ok, result.detail
        tokens = [token for token, _ in terms]
        assert tokens == sorted(set(tokens)) and tokens[1] == tokens[0] + 1, tokens
    finally:
        await stop_all(*runners)
    _, body = seat(s3, bucket, election)
    assert body["holder"] is None and body["term"] == tokens[-1] + 1


async def test_cluster_and_shard_elections_side_by_side_in_one_bucket(
    s3_url: str, bucket: str, s3: Any
) -> None:
    cluster, shard = election_name("cluster"), election_name("shard")
    runners = {
        name: [make_runner(s3_url, bucket, name, agent) for agent in ("a", "b")]
        for name in (cluster, shard)
    }
    for group in runners.values():
        for r in group:
            await r.start()
    try:
        leaders = {name: await eventually(lambda g=g: the_leader(g)) for name, g in runners.items()}
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
        assert keys == {f"electorate/{cluster}.json", f"electorate/{shard}.json"}
        shard_leader, shard_token = leaders[shard], leaders[shard].token
        result = await leaders[cluster].step_down(hold_off=2.0)
        assert result.ok, result.detail
        assert shard_leader.is_leader() and shard_leader.token == shard_token
        assert seat(s3, bucket, shard)[1]["holder"] == shard_leader.agent_id
    finally:
        await stop_all(*(r for g in runners.values() for r in g))


async def test_retry_interval_follows_what_was_last_seen(
    s3_url: str, bucket: str, election: str, s3: Any
) -> None:
    options = S3Options(endpoint=s3_url, bucket=bucket, leader_timeout=1.0)
    backend = S3Backend(election=election, agent_id="me", ttl=3.0, options=options)
    frequent, infrequent = backend.timing.frequent, backend.timing.infrequent
    assert (frequent, infrequent) == (0.25, 0.5)
    async with opened(backend):
        assert await backend.observe() == Seat()
        assert backend.retry_interval == frequent  # no seat at all
        key = f"electorate/{election}.json"
        s3.put_object(Bucket=bucket, Key=key, Body=json.dumps({"holder": "x", "term": 3}))
        assert (await backend.observe()).leader == "x"
        assert backend.retry_interval == pytest.approx(infrequent, abs=0.01)
        await asyncio.sleep(0.8)  # the same ETag: close to stale, so wake up right then
        assert backend.retry_interval < 0.3
        await asyncio.sleep(0.3)
        seen = await backend.observe()
        assert seen.leader is None and seen.token == 3  # stale: up for grabs
        assert backend.retry_interval == frequent


async def test_elections_of_one_process_share_one_client(s3_url: str, bucket: str) -> None:
    """A boto3 client weighs some 10 MB: 100 elections must not make 100 of them."""
    same = S3Options(endpoint=s3_url, bucket=bucket)
    backends = [
        S3Backend(election=election_name(), agent_id="a", ttl=TTL, options=same) for _ in range(3)
    ]
    elsewhere = S3Options(endpoint=s3_url, bucket=bucket, region="eu-west-1")
    other = S3Backend(election=election_name(), agent_id="a", ttl=TTL, options=elsewhere)
    for b in [*backends, other]:
        await b.open()
    key = backends[0]._client_key
    try:
        assert len({id(b._client) for b in backends}) == 1
        assert other._client is not backends[0]._client  # another region: its own client
        for b in backends:
            assert await b.campaign() is not None  # each its own seat, through one client
    finally:
        for b in [*backends, other]:
            await b.close()
    assert key not in CLIENTS._clients  # the last election out closed it


def client_error(status: int, code: str) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (412, "PreconditionFailed", "lost"),
        (409, "ConditionalRequestConflict", "conflict"),
        (404, "NoSuchKey", "gone"),
        (500, "InternalError", "error"),
    ],
)
def test_conditional_write_refusals_are_classified(status: int, code: str, kind: str) -> None:
    # moto never answers 409, so that mapping is pinned here on botocore's own error type.
    assert classify(refusal(client_error(status, code))) == kind


def test_defaults() -> None:
    backend = S3Backend(election="db/main", agent_id="a", ttl=8, options=S3Options(bucket="b-1"))
    assert backend.key == "electorate/db/main.json"
    assert (backend.timing.leader_timeout, backend.timing.frequent) == (8, 2)
    assert backend.timing.infrequent == 4
    assert backend.renew_interval == 2 and backend.retry_interval == 2


@pytest.mark.parametrize(
    ("options", "field", "message"),
    [
        ({}, "bucket", "required option is missing"),
        ({"bucket": "Not_A_Bucket"}, "bucket", "not a valid bucket name"),
        ({"bucket": "ok-bucket", "endpoint": "localhost:9000"}, "endpoint", "http(s)://"),
        ({"bucket": "ok-bucket", "frequent_interval": "6s"}, "frequent_interval", "half"),
        (
            {"bucket": "ok-bucket", "frequent_interval": "1s", "infrequent_interval": "500ms"},
            "infrequent_interval",
            "shorter",
        ),
        ({"bucket": "ok-bucket", "leader_timeout": "soon"}, "leader_timeout", "duration"),
        ({"bucket": "ok-bucket", "access_key": "AK"}, "secret_key", "go together"),
        ({"bucket": "ok-bucket", "key": ""}, "key", "empty"),
        ({"bucket": "ok-bucket", "lease": 3}, "lease", "unknown option"),
    ],
)
def test_bad_options(tmp_path: Path, options: dict[str, Any], field: str, message: str) -> None:
    error = refused_options(tmp_path, "s3", "10s", options)
    assert error.field.startswith(f"election[0] (db).{field}"), error.field
    assert message in error.message, error.message
