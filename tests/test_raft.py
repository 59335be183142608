"""The Raft-style backend: one leader per term, re-election, no-vote members, pre-vote,
one vote per term, leadership transfer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.backends.raft import PeerAuth, RaftBackend, RaftNode, RaftOptions
from agent.config import ConfigError, ElectionConfig, build_config
from agent.runner import ElectionRunner
from tests.helpers import eventually, free_port

SECRET = "raft-tests-shared-secret"


def make_cluster(
    n: int, *, no_vote: set[int] = frozenset(), election: str = "svc/raft", timeout: str = "300ms"
) -> list[ElectionRunner]:
    ports = [free_port() for _ in range(n)]
    peers = [{"address": f"127.0.0.1:{p}", "no_vote": i in no_vote} for i, p in enumerate(ports)]
    runners = []
    for i, port in enumerate(ports):
        options = RaftOptions.model_validate(
            {
                "listen": f"127.0.0.1:{port}",
                "peers": peers,
                "heartbeat": "50ms",
                "election_timeout": timeout,
                "no_vote": i in no_vote,
                "secret": SECRET,
            }
        )
        config = ElectionConfig(
            name=election, backend="raft", ttl=1.0, labels={}, observer=False, options=options
        )
        runners.append(ElectionRunner(config, f"node-{i}", hold_off=1.0))
    return runners


def leaders(runners: list[ElectionRunner]) -> list[ElectionRunner]:
    return [r for r in runners if r.is_leader()]


async def start(runners: list[ElectionRunner]) -> None:
    for r in runners:
        await r.start()


async def stop(runners: list[ElectionRunner]) -> None:
    await asyncio.gather(*(r.stop(resign=False) for r in runners))


@contextlib.asynccontextmanager
async def cluster(n: int, **kwargs: Any) -> AsyncIterator[list[ElectionRunner]]:
    """``make_cluster(n, ...)``, started; stopped (without resigning) when the block ends."""
    runners = make_cluster(n, **kwargs)
    await start(runners)
    try:
        yield runners
    finally:
        await stop(runners)


async def test_elects_exactly_one_leader_and_followers_agree() -> None:
    async with cluster(3) as runners:

        def agreed() -> ElectionRunner | None:
            # One leader, and every member names it with its term.
            current = leaders(runners)
            if len(current) != 1:
                return None
            [leader] = current
            views = {(r.leader, r.token) for r in runners}
            return leader if views == {(leader.agent_id, leader.token)} else None

        leader = await eventually(agreed)
        assert {r.state for r in runners if r is not leader} == {"follower"}


async def test_at_most_one_leader_per_term_over_many_elections() -> None:
    runners = make_cluster(3)
    seen: dict[int, set[str]] = {}
    await start(runners)
    try:
        deadline = time.monotonic() + 4
        kills = 0
        while time.monotonic() < deadline:
            for r in runners:
                if r.is_leader():
                    seen.setdefault(r.token, set()).add(r.agent_id)
            current = leaders(runners)
            assert len(current) <= 1, [r.agent_id for r in current]
            if current and kills < 3 and time.monotonic() > deadline - 3.5 + kills:
                # Force churn: the leader steps down, another must win a later term.
                await current[0].step_down(hold_off=0.5)
                kills += 1
            await asyncio.sleep(0.01)
        assert kills == 3
        assert len(seen) >= 3, seen
        assert all(len(ids) == 1 for ids in seen.values()), seen
    finally:
        await stop(runners)


async def test_reelects_after_the_leader_stops() -> None:
    async with cluster(3) as runners:
        [old] = await eventually(lambda: leaders(runners) or None)
        old_term = old.token
        # A crash, not a resign: the node just vanishes.
        await old.backend.close()
        rest = [r for r in runners if r is not old]
        started = time.monotonic()
        [new] = await eventually(lambda: leaders(rest) or None, timeout=5)
        assert new.token > old_term
        assert time.monotonic() - started < 1.5  # 2 x election timeout + a vote round
        await eventually(lambda: not old.is_leader(), timeout=2)


async def test_no_vote_members_never_lead() -> None:
    async with cluster(3, no_vote={2}) as runners:
        for _ in range(3):
            [leader] = await eventually(lambda: leaders(runners) or None)
            assert leader is not runners[2]
            assert runners[2].state == "no-vote"
            await leader.step_down(hold_off=0.2)
        await eventually(lambda: runners[2].leader is not None)
        assert not runners[2].is_leader()


async def test_two_voters_and_a_no_vote_member_need_both_voters() -> None:
    async with cluster(3, no_vote={2}) as runners:
        [leader] = await eventually(lambda: leaders(runners) or None)
        other_voter = runners[1] if leader is runners[0] else runners[0]
        await other_voter.backend.close()
        # Quorum of 2 voters is 2: the leader loses its lease and nobody can win.
        await eventually(lambda: not leader.is_leader(), timeout=2)
        await asyncio.sleep(1.0)
        assert leaders(runners) == []


async def test_a_node_votes_once_per_term() -> None:
    [node] = [r.backend.node for r in make_cluster(1)]
    node.term = 5
    assert node._on_vote(6, "a", pre=False, transfer_from=None)["granted"]
    assert not node._on_vote(6, "b", pre=False, transfer_from=None)["granted"]
    assert node._on_vote(6, "a", pre=False, transfer_from=None)[
        "granted"
    ]  # a retry, not a 2nd vote


async def test_a_vote_backs_its_winner_for_t_even_in_a_later_term() -> None:
    # Without this, a rival could win term 7 with our vote while term 6's winner still holds
    # the lease our term-6 vote gave it: two leaders at once.
    [node] = [r.backend.node for r in make_cluster(1)]
    node.term = 5
    assert node._on_vote(6, "a", pre=False, transfer_from=None)["granted"]
    assert not node._on_vote(7, "b", pre=True, transfer_from=None)["granted"]
    assert not node._on_vote(7, "b", pre=False, transfer_from=None)["granted"]
    node.voted_at -= node.election_timeout  # T has passed
    assert node._on_vote(7, "b", pre=False, transfer_from=None)["granted"]


async def test_a_transfer_overrides_stickiness_only_for_the_leader_that_asked() -> None:
    [node] = [r.backend.node for r in make_cluster(1)]
    assert node._on_append(5, "old")["ok"]  # a healthy leader "old" in term 5
    assert not node._on_vote(6, "x", pre=False, transfer_from=None)["granted"]
    assert not node._on_vote(6, "x", pre=False, transfer_from="someone-else")["granted"]
    assert node._on_vote(6, "x", pre=False, transfer_from="old")["granted"]
    # A second transfer campaign (a retried TimeoutNow to another peer) cannot also win.
    assert not node._on_vote(7, "y", pre=False, transfer_from="old")["granted"]


async def test_pre_vote_does_not_disturb_a_healthy_leader() -> None:
    async with cluster(3) as runners:
        [leader] = await eventually(lambda: leaders(runners) or None)
        follower = next(r for r in runners if r is not leader)
        term = leader.token
        # The follower is "partitioned": it stops hearing heartbeats and times out repeatedly.
        node = follower.backend.node
        for _ in range(5):
            node.last_heard = -1e9
            await node._campaign(pre_vote=True)
        # Its pre-votes are refused by nodes that hear the leader; no term was bumped.
        assert leader.is_leader()
        assert leader.backend.node.term == term
        assert node.term == term


async def test_leadership_transfer_hands_over_to_the_named_successor() -> None:
    async with cluster(3) as runners:
        [leader] = await eventually(lambda: leaders(runners) or None)
        await eventually(lambda: len(leader.backend.node.peer_ids) == 2)
        successor = next(r for r in runners if r is not leader)
        started = time.monotonic()
        result = await leader.step_down(hold_off=1.0, successor=successor.agent_id)
        assert result.ok, result.detail
        await eventually(successor.is_leader, timeout=0.5)
        assert time.monotonic() - started < 0.5
        assert result.token == successor.token > 0


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        RaftOptions.model_validate({"listen": "nowhere"})
    options = RaftOptions.model_validate(
        {"listen": "127.0.0.1:1", "heartbeat": "1s", "election_timeout": "1s", "secret": SECRET}
    )
    assert RaftBackend.check_options(options, 10) == (
        "heartbeat",
        "must be at most half of election_timeout",
    )


@contextlib.asynccontextmanager
async def bare_nodes(n: int, timeout: str = "300ms") -> AsyncIterator[list[RaftNode]]:
    """``n`` started nodes that campaign only when a test makes them eligible; stopped when the
    block ends."""
    nodes = [r.backend.node for r in make_cluster(n, timeout=timeout)]
    for node in nodes:
        await node.start()
    try:
        yield nodes
    finally:
        await asyncio.gather(*(node.stop() for node in nodes))


async def pre_vote_sent(node: RaftNode) -> tuple[int, asyncio.Task[None]]:
    """Make ``node`` campaign with a pre-vote; once its requests are on their way, its term
    before the campaign and the campaign."""
    node.eligible = True
    term = node.term
    campaign = asyncio.create_task(node._campaign(pre_vote=True))
    await asyncio.sleep(0)  # the pre-vote requests are on their way
    return term, campaign


async def test_a_pre_vote_answered_after_a_newer_vote_is_dropped() -> None:
    # After a partition heals, a node's pre-vote may come back granted after the node has
    # already voted for someone else in a newer term; campaigning on it deposed that winner.
    async with bare_nodes(3) as nodes:
        node = nodes[2]
        term, campaign = await pre_vote_sent(node)
        assert node._on_vote(term + 1, "node-0", pre=False, transfer_from=None)["granted"]
        await campaign
        assert (node.term, node.role, node.voted_for) == (term + 1, "follower", "node-0")


async def test_a_pre_vote_answered_after_a_leader_was_heard_is_dropped() -> None:
    async with bare_nodes(3) as nodes:
        node = nodes[2]
        term, campaign = await pre_vote_sent(node)
        assert node._on_append(term, "node-0")["ok"]  # a leader of this very term spoke
        await campaign
        assert (node.term, node.role, node.leader_id) == (term, "follower", "node-0")


async def test_back_to_back_step_downs_are_handed_over_at_once() -> None:
    # node-0 steps down first and holds off throughout; the other two then pass the seat back
    # and forth, each step-down right after the previous one completed. A handover must never
    # go to the member holding off (it would refuse, and the seat would wait for an election
    # timeout of 1-2 s): each must be taken over in a fraction of the election timeout.
    runners = make_cluster(3, timeout="1s")
    for runner in runners:
        runner.flap_limit = 0  # the damper would rightly hold off a member that wins this often
    await start(runners)
    try:
        [first] = await eventually(lambda: leaders(runners) or None)
        result = await first.step_down(hold_off=60)
        assert result.ok, result.detail
        gaps = []
        for _ in range(8):
            [leader] = await eventually(lambda: leaders(runners) or None, timeout=5)
            started = time.monotonic()
            result = await leader.step_down(hold_off=0)
            assert result.ok, result.detail
            [new] = await eventually(lambda: leaders(runners) or None, timeout=5)
            gaps.append(round(time.monotonic() - started, 3))
            assert new not in (leader, first), (new.agent_id, leader.agent_id)
        assert max(gaps) < 0.5, f"seconds from each step-down to the next leader: {gaps}"
    finally:
        await stop(runners)


async def test_a_handover_never_goes_to_a_member_holding_off() -> None:
    async with bare_nodes(3, timeout="1s") as nodes:
        for node in nodes:
            node.eligible = True
        for i in range(8):
            leader = await eventually(lambda: next((n for n in nodes if n.lease()), None))
            holding, ready = [n for n in nodes if n is not leader][:: 1 if i % 2 else -1]
            holding.eligible = False  # its runner holds off (after its own step-down, say)
            await asyncio.sleep(0.12)  # a heartbeat round or two
            started = time.monotonic()
            await leader.step_down(None)
            await eventually(
                lambda r=ready, h=holding: r.lease() or h.role != "follower", timeout=5
            )
            took = time.monotonic() - started
            assert holding.role == "follower" and ready.lease(), (holding.role, ready.role)
            assert took < 0.5, f"handover {i} took {took:.2f}s"
            holding.eligible = leader.eligible = True


async def test_a_member_whose_runner_holds_off_is_not_handed_the_seat() -> None:
    # A switchover makes the other members hold off; a held-off member that took a handover
    # would win the node's election while its runner refuses to lead: nobody would lead.
    for _ in range(4):  # a random pick would land on the held-off member half the time
        async with cluster(3, timeout="1s") as runners:
            [leader] = await eventually(lambda rs=runners: leaders(rs) or None)
            held, other = [r for r in runners if r is not leader]
            held.hold(30)
            await asyncio.sleep(0.12)  # a heartbeat round or two
            started = time.monotonic()
            result = await leader.step_down(hold_off=30)
            assert result.ok and result.leader == other.agent_id, result
            assert other.is_leader() and time.monotonic() - started < 0.5


def port_of(runner: ElectionRunner) -> int:
    return int(runner.config.options.listen.rsplit(":", 1)[1])


async def exchange(port: int, message: dict[str, Any]) -> dict[str, Any]:
    """Send one line to a member's peer port, as anyone on the network could."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(json.dumps(message).encode() + b"\n")
        await writer.drain()
        return json.loads(await asyncio.wait_for(reader.readline(), 2))
    finally:
        writer.close()


async def settled(runners: list[ElectionRunner]) -> tuple[ElectionRunner, int]:
    [leader] = await eventually(lambda: leaders(runners) or None)
    await eventually(lambda: all(r.leader == leader.agent_id for r in runners))
    return leader, leader.token


async def assert_still_leads(
    runners: list[ElectionRunner], leader: ElectionRunner, term: int
) -> None:
    await asyncio.sleep(0.3)  # several heartbeats
    assert leader.is_leader() and leader.token == term
    assert {r.backend.node.term for r in runners} == {term}


async def test_an_unsigned_append_with_a_higher_term_does_not_depose_the_leader() -> None:
    async with cluster(3) as runners:
        leader, term = await settled(runners)
        forged = {"type": "append", "term": term + 100, "leader": "evil", "election": "svc/raft"}
        for runner in runners:
            reply = await exchange(port_of(runner), forged)
            assert "error" in reply and "mac" not in reply, reply
        await assert_still_leads(runners, leader, term)


async def test_a_message_signed_with_another_secret_is_refused() -> None:
    async with cluster(3) as runners:
        leader, term = await settled(runners)
        member = next(r for r in runners if r is not leader)
        wrong = PeerAuth(b"some-other-secret-of-sixteen", "svc/raft")
        forged = wrong.seal(
            {
                "type": "append",
                "term": term + 100,
                "election": "svc/raft",
                "from": member.config.options.listen,
                "id": member.agent_id,
            }
        )
        reply = await exchange(port_of(leader), forged)
        assert reply == {"error": "not signed with this election's secret"}
        await assert_still_leads(runners, leader, term)


async def test_a_signed_message_from_a_non_member_or_replayed_is_refused() -> None:
    async with cluster(3) as runners:
        leader, term = await settled(runners)
        auth = PeerAuth(SECRET.encode(), "svc/raft")
        stranger = auth.seal(
            {
                "type": "append",
                "term": term + 100,
                "election": "svc/raft",
                "from": f"127.0.0.1:{free_port()}",  # has the secret, is not in the peers list
                "id": "stranger",
            }
        )
        reply = await exchange(port_of(leader), stranger)
        assert reply == {"error": "the sender is not one of this election's peers"}
        # A member's own message, captured and sent again: harmless the first time (a
        # pre-vote), refused the second.
        member = next(r for r in runners if r is not leader)
        other = next(r for r in runners if r not in (leader, member))
        captured = auth.seal(
            {
                "type": "vote",
                "term": term + 1,
                "pre": True,
                "election": "svc/raft",
                "from": member.config.options.listen,
                "id": member.agent_id,
            }
        )
        first = await exchange(port_of(other), captured)
        assert first["granted"] is False and auth.signed(first), first
        assert await exchange(port_of(other), captured) == {"error": "stale or replayed"}
        stale = {**captured, "ts": captured["ts"] - 60_000, "nonce": "fresh-nonce"}
        stale["mac"] = auth._mac({k: v for k, v in stale.items() if k != "mac"})
        assert await exchange(port_of(other), stale) == {"error": "stale or replayed"}
        await assert_still_leads(runners, leader, term)


def test_a_secret_is_required_and_secret_file_is_relative_to_the_config(tmp_path: Path) -> None:
    def election(**options: Any) -> dict[str, Any]:
        table = {"name": "e", "backend": "raft", "listen": "127.0.0.1:7001", **options}
        return {"election": [table]}

    config = tmp_path / "conf" / "agent.toml"
    config.parent.mkdir()
    problems = {
        "secret": election(),
        "secret_file": election(secret=SECRET, secret_file="s.secret"),
    }
    for field, raw in problems.items():
        with pytest.raises(ConfigError) as info:
            build_config(raw, config)
        assert info.value.field == f"election[0] (e).{field}", info.value
    with pytest.raises(ConfigError, match="at least 16 characters"):
        build_config(election(secret="short"), config)
    with pytest.raises(ConfigError, match="cannot read") as info:
        build_config(election(secret_file="s.secret"), config)
    assert info.value.field == "election[0] (e).secret_file"
    (config.parent / "s.secret").write_text(SECRET + "\n")
    [parsed] = build_config(election(secret_file="s.secret"), config).elections
    assert parsed.options.shared_secret() == SECRET.encode()
    assert SECRET not in repr(build_config(election(secret=SECRET), config).elections[0])


async def test_with_nobody_ready_the_first_member_back_in_the_race_takes_over_at_once() -> None:
    async with cluster(3, timeout="1s") as runners:
        leader, _ = await settled(runners)
        others = [r for r in runners if r is not leader]
        for runner in others:
            runner.hold(0.5)  # say, a switchover to a member that then went away
        await asyncio.sleep(0.12)
        started = time.monotonic()
        result = await leader.step_down(hold_off=30)
        assert result.ok, result.detail
        took = time.monotonic() - started
        # When the hold-offs end (0.38 s from here), not an election timeout (1-2 s) later.
        assert 0.3 < took < 0.9, f"{result.leader} took over after {took:.2f}s"
