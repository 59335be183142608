"""One conformance suite for every election backend, each against its real server.

A backend plugs in with ``tests/backends/setup_<name>.py`` exporting ``SERVER_FIXTURE`` (the
session fixture giving its server URL, or None), ``TTL`` (short, for tests), ``options(server,
election, index, n)`` (the ``[[election]]`` options of agent ``index`` of ``n``, unique per
election name) and ``async cut_off(runner, server)`` (make that runner lose its backend the hard
way). A backend whose seat lives in a server may also export ``async remove_seat(server,
election)``: take the seat away from whoever holds it, from outside and behind its back, the
way an operator or the server itself can (etcd: revoke the leader's lease; PostgreSQL:
terminate the leader's session; Redis, NATS, S3: delete the key or object). A missing setup
module is a failing test, never a skip.

What every backend must do: at most one leader at any moment, fencing tokens that only grow, a
killed leader replaced within TTL + 1 s, a resign taken over at once where followers are
notified, a leader that demotes itself before another can win when it loses the backend or its
seat is taken away from outside, callbacks in order and on transitions only, and bad options
refused at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.config import ConfigError, build_config
from agent.runner import ElectionRunner, StepDownResult
from tests.backends.conformance import (
    NAMES,
    REPO,
    AgentProcess,
    Elections,
    Event,
    HealthSampler,
    Sampler,
    Target,
    describe,
    leaders,
    load_setup,
    one_leader,
    settled_leader,
    target_for,
    toml_dumps,
    wait_until,
)
from tests.helpers import repo_python

#: Margin on top of the TTL for a killed leader to be replaced: its seat frees when the TTL runs
#: out, and a follower still needs a watch event or a poll, and a claim, to take it. A resign
#: with change notification must be taken over in under a second.
KILL_MARGIN = 1.0
NOTIFIED_RESIGN = 1.0
#: Generous bounds for agents to start and settle; they are waits, not measurements.
START = 10.0


@pytest.fixture(params=NAMES)
def backend(request: pytest.FixtureRequest) -> Target:
    return target_for(request)


def _removable() -> list[str]:
    names = []
    for name in NAMES:
        with contextlib.suppress(ImportError):  # a missing module fails the `backend` cases
            if hasattr(load_setup(name), "remove_seat"):
                names.append(name)
    return names


@pytest.fixture(params=_removable())
def removable(request: pytest.FixtureRequest) -> Target:
    """A backend whose setup module can take the seat away from outside (``remove_seat``)."""
    return target_for(request)


@pytest.fixture
async def elections() -> AsyncIterator[Elections]:
    """Runners and agent clusters the test starts: stopped and cleaned up when it ends."""
    started = Elections()
    try:
        yield started
    finally:
        await started.stop()


async def failover(
    backend: Target, tmp_path: Path, elections: Elections, sig: int
) -> tuple[AgentProcess, float]:
    """Signal the leader of a fresh agent cluster: that leader, and how long until another led."""
    cluster = elections.cluster(backend, tmp_path)
    leader = await cluster.leader(backend.ttl + START)
    elapsed, new = await cluster.failover(leader, sig, backend.ttl + 10)
    assert new != leader.id
    return leader, elapsed


async def churn(
    runners: list[ElectionRunner], backend: Target, step_downs: int
) -> list[tuple[ElectionRunner, StepDownResult]]:
    """Once one leads, step down whoever leads ``step_downs`` times, each sitting out longer
    than a failover so that one of the others must win; then one leads again. Who stepped down,
    and how that went."""
    await one_leader(runners, backend.ttl + START)
    done = []
    for _ in range(step_downs):
        leader = await one_leader(runners, backend.ttl + KILL_MARGIN + 1)
        done.append((leader, await leader.step_down(hold_off=backend.ttl + 1)))
    await one_leader(runners, backend.ttl + KILL_MARGIN + 1)
    return done


def resign_bound(t: Target) -> float:
    return NOTIFIED_RESIGN if t.cls.notifies else t.ttl + KILL_MARGIN


# -- safety -----------------------------------------------------------------------------------


async def test_exactly_one_leader_emerges_and_followers_know_it(
    backend: Target, elections: Elections
) -> None:
    runners = await elections.start(backend)
    async with Sampler(runners) as sampler:
        await one_leader(runners, backend.ttl + START)
        # Followers learn who leads from observe(), within a retry interval.
        leader = await settled_leader(runners, backend.ttl + KILL_MARGIN)
        assert {r.state for r in runners if r is not leader} == {"follower"}, describe(runners)
        assert leader.token is not None
    assert sampler.overlaps == [], "two leaders at once"


async def test_at_most_one_leader_while_leadership_churns(
    backend: Target, elections: Elections
) -> None:
    runners, recorder = await elections.recorded(backend)
    async with Sampler(runners) as sampler:
        for leader, result in await churn(runners, backend, 3):
            assert result.ok, f"step-down of {leader.agent_id}: {result.detail}"
    assert sampler.samples > 100
    assert sampler.overlaps == [], f"two leaders at once: {sampler.overlaps[:3]}"
    assert all(e.others_leading == () for e in recorder.wins()), recorder.wins()
    assert len(recorder.wins()) >= 4
    for runner in runners:
        check_callback_order(recorder.of(runner.agent_id), runner.agent_id)


async def test_fencing_tokens_strictly_increase_across_leaders(
    backend: Target, elections: Elections
) -> None:
    runners, recorder = await elections.recorded(backend)
    async with Sampler(runners) as sampler:
        await churn(runners, backend, 2)
    tokens = [e.token for e in recorder.wins()]
    assert len(tokens) >= 3, recorder.wins()
    assert all(isinstance(t, int) for t in tokens), tokens
    assert all(a < b for a, b in itertools.pairwise(tokens)), (
        f"tokens of successive leaders: {tokens}"
    )
    sampled = [token for agent, token in sampler.changes if agent is not None]
    assert sampled == sorted(set(sampled)), f"tokens sampled while leading: {sampled}"


async def test_leader_cut_off_from_the_backend_demotes_before_another_wins(
    backend: Target, elections: Elections
) -> None:
    runners, recorder = await elections.recorded(backend)
    async with Sampler(runners) as sampler:
        old = await settled_leader(runners, backend.ttl + START)
        elections.stop_without_resign(old)
        cut_at = time.monotonic()
        await backend.setup.cut_off(old, backend.server)
        others = [r for r in runners if r is not old]
        new = (await wait_until(lambda: leaders(others), 2 * backend.ttl + 5, "new leader"))[0]
        await wait_until(lambda: recorder.of(old.agent_id, ["lost"]), 2, "on_lost of old")
    for runner in runners:
        check_callback_order(recorder.of(runner.agent_id), runner.agent_id)
    losts = recorder.of(old.agent_id, ["lost"])
    assert len(losts) == 1, f"{old.agent_id} lost {len(losts)} times: {losts[:4]}"
    lost = losts[0]
    assert lost.reason in ("lost", "expired"), f"on_lost reason {lost.reason!r}"
    [transition] = [
        t for _, agent, t in recorder.transitions if agent == old.agent_id and t.from_ == "leader"
    ]
    assert transition.reason in ("lost", "expired"), transition
    won = next(e for e in recorder.wins() if e.agent == new.agent_id and e.at > cut_at)
    assert old.agent_id not in won.others_leading, (
        f"{old.agent_id} still claimed leadership when {new.agent_id} won"
    )
    assert lost.at <= won.at, (
        f"{new.agent_id} won {lost.at - won.at:.3f}s before {old.agent_id} reported lost"
    )
    assert sampler.overlaps == [], f"two leaders at once: {sampler.overlaps[:3]}"
    assert lost.at - cut_at < backend.ttl + KILL_MARGIN


async def test_seat_taken_away_from_outside_is_never_claimed_by_two(
    removable: Target, tmp_path: Path, elections: Elections
) -> None:
    """The seat is removed behind the leader's back while followers watch it: the old leader
    must stop claiming it before any follower, woken by the removal, claims it. Checked where
    a load balancer looks, at every agent's health endpoint, every 20 ms."""
    t = removable
    cluster = elections.cluster(t, tmp_path)
    old = await cluster.leader(t.ttl + START)
    before = await old.state()
    assert before is not None and before["token"] is not None, before
    async with HealthSampler(cluster.agents) as sampler:
        await asyncio.sleep(0.2)
        removed = time.monotonic()
        await t.setup.remove_seat(t.server, cluster.election)

        async def new_term() -> bool:
            # Someone (the old leader included) leads again, with a newer fencing token.
            current = sampler.leaders_since(time.monotonic() - 0.05)
            if not current or len(current[-1]) != 1:
                return False
            [agent] = [a for a in cluster.agents if a.id == current[-1][0]]
            state = await agent.state()
            return state is not None and (state["token"] or 0) > before["token"]

        deadline = removed + 2 * t.ttl + 5
        while not await new_term():
            assert time.monotonic() < deadline, f"nobody leads again\n{cluster.logs()}"
            await asyncio.sleep(0.02)
        took_over = time.monotonic() - removed
        await asyncio.sleep(0.3)
    spans = [(round(last - first, 3), agents) for first, last, agents in sampler.overlaps()]
    assert spans == [], (
        f"two agents answered 200 at once after the seat was removed (span seconds, "
        f"agents): {spans}; new term after {took_over:.2f}s\n{cluster.logs()}"
    )
    assert sampler.rounds > 20, "the health endpoints were hardly sampled"


# -- liveness ---------------------------------------------------------------------------------


async def test_resign_is_taken_over_quickly(backend: Target, elections: Elections) -> None:
    runners = await elections.start(backend)
    leader = await settled_leader(runners, backend.ttl + START)
    others = [r for r in runners if r is not leader]
    started = time.monotonic()
    step_down = asyncio.create_task(leader.step_down(hold_off=backend.ttl + 1))
    await wait_until(lambda: leaders(others), backend.ttl + 5, "a new leader")
    elapsed = time.monotonic() - started
    result = await step_down
    assert result.ok, result.detail
    assert elapsed < resign_bound(backend), (
        f"resign taken over after {elapsed:.3f}s (notifies={backend.cls.notifies})"
    )


async def test_killed_leader_process_is_replaced_within_ttl(
    backend: Target, tmp_path: Path, elections: Elections
) -> None:
    _, elapsed = await failover(backend, tmp_path, elections, signal.SIGKILL)
    assert elapsed < backend.ttl + KILL_MARGIN, (
        f"killed leader replaced after {elapsed:.2f}s, TTL {backend.ttl}s"
    )


async def test_sigterm_leader_process_resigns_and_is_taken_over(
    backend: Target, tmp_path: Path, elections: Elections
) -> None:
    leader, elapsed = await failover(backend, tmp_path, elections, signal.SIGTERM)
    assert elapsed < resign_bound(backend), (
        f"SIGTERM'd leader taken over after {elapsed:.2f}s (notifies={backend.cls.notifies})"
    )
    code = await leader.wait(backend.ttl + 5)
    assert code == 0, f"agent exited with {code}\n{leader.tail()}"


# -- callbacks --------------------------------------------------------------------------------


def check_callback_order(events: list[Event], agent: str) -> None:
    """campaign? -> won -> lost, repeated; never won twice without a lost in between."""
    leading = False
    for i, e in enumerate(events):
        context = f"{agent}, callback #{i} of {len(events)}: {events[max(0, i - 3) : i + 2]}"
        if e.kind == "won":
            assert not leading, f"on_won while already leading: {context}"
            leading = True
        elif e.kind == "lost":
            assert leading, f"on_lost without on_won: {context}"
            leading = False
        elif e.kind == "campaign":
            assert not leading, f"on_campaign while leading: {context}"


async def test_callbacks_fire_in_order_and_only_on_transitions(
    backend: Target, elections: Elections
) -> None:
    runners, recorder = await elections.recorded(backend)
    leader = await settled_leader(runners, backend.ttl + START)
    # Several renewals of a healthy leader: not one callback, anywhere.
    quiet_from = len(recorder.events)
    await asyncio.sleep(3.5 * leader.backend.renew_interval)
    assert leader.is_leader()
    assert recorder.events[quiet_from:] == [], "callbacks while nothing changed"
    await leader.step_down(hold_off=backend.ttl + 1)
    await one_leader(runners, backend.ttl + KILL_MARGIN + 1)
    await elections.stop()
    assert len(recorder.wins()) >= 2
    for runner in runners:
        events = recorder.of(runner.agent_id)
        check_callback_order(events, runner.agent_id)
        # Every runner stopped: whoever won must have lost (resigned) by now.
        assert [e.kind for e in events if e.kind != "campaign"].count("won") == len(
            [e for e in events if e.kind == "lost"]
        ), f"{runner.agent_id}: {events}"
    first = recorder.of(leader.agent_id, ["won", "lost"])[:2]
    assert [e.kind for e in first] == ["won", "lost"]
    assert first[1].reason in ("forced", "resigned"), first[1]


# -- configuration ----------------------------------------------------------------------------


def test_unknown_option_fails_at_start_naming_it(backend: Target, tmp_path: Path) -> None:
    election = backend.election_name()
    raw = backend.raw_config("agent-0", election, 0, 1)
    raw["election"][0]["no_such_option"] = "x"
    with pytest.raises(ConfigError) as info:
        build_config(raw, tmp_path / "agent.toml")
    assert "no_such_option" in str(info.value)
    assert "unknown option" in str(info.value)
    # And the agent itself refuses to start, saying so.
    path = tmp_path / "agent.toml"
    path.write_text(toml_dumps(raw))
    proc = subprocess.run(
        [repo_python(), "-m", "agent", "run", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert "no_such_option" in proc.stderr and "unknown option" in proc.stderr, proc.stderr


def test_missing_required_option_fails_at_start_naming_it(backend: Target, tmp_path: Path) -> None:
    required = [n for n, f in backend.cls.Options.model_fields.items() if f.is_required()]
    assert required, f"{backend.cls.__name__}.Options has no required option"
    election = backend.election_name()
    for name in required:
        raw = backend.raw_config("agent-0", election, 0, 1)
        raw["election"][0].pop(name, None)
        with pytest.raises(ConfigError) as info:
            build_config(raw, tmp_path / "agent.toml")
        assert name in info.value.field, str(info.value)
        assert "required option is missing" in str(info.value)
