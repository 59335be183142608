"""The agent websocket against a real server, in embedded and production mode."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import protocol
from tests.helpers import event
from tests.live import LiveDashboard, frame, open_agent

pytestmark = pytest.mark.live


async def test_it_refuses_a_handshake_without_a_valid_token(dashboard: LiveDashboard) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic x"}):
        with pytest.raises(InvalidStatus) as info:
            async with connect(dashboard.ws_agent, additional_headers=headers):
                pass
        assert info.value.response.status_code == 403


async def test_a_token_cannot_speak_for_another_agent(dashboard: LiveDashboard) -> None:
    ws = await connect(
        dashboard.ws_agent,
        additional_headers={"Authorization": f"Bearer {dashboard.token('honest-1')}"},
    )
    await ws.send(json.dumps({"type": "hello", "agent": "victim-1", "elections": []}))
    reply = await frame(ws)
    assert reply["type"] == "error" and reply["code"] == "wrong-agent"
    with pytest.raises(ConnectionClosed) as info:
        await ws.recv()
    assert info.value.rcvd.code == protocol.CLOSE_WRONG_AGENT


async def test_events_are_acked_and_replays_change_nothing(dashboard: LiveDashboard) -> None:
    agent_id, election = f"a-{uuid.uuid4().hex[:8]}", f"svc/{uuid.uuid4().hex[:8]}"
    ws = await open_agent(dashboard, agent_id, [election])
    assert await frame(ws) == {"type": "ack", "seq": 0}
    batch = [event(1, election, leader=agent_id), event(2, election, to="follower", token=1)]
    batch[1]["from"] = "leader"
    batch[1]["reason"] = "resigned"
    await ws.send(json.dumps({"type": "events", "items": batch}))
    assert await frame(ws) == {"type": "ack", "seq": 2}
    await ws.send(json.dumps({"type": "events", "items": batch}))  # a replay after a reconnect
    assert await frame(ws) == {"type": "ack", "seq": 2}
    await ws.close()

    counts = dashboard.shell(
        "from elections.models import Transition, Term; "
        f"print(Transition.objects.filter(agent_id={agent_id!r}).count(), "
        f"list(Term.objects.filter(leader_id={agent_id!r}).values_list('token', 'end_reason')))",
    )
    assert counts == "2 [(1, 'resigned')]"

    # A reconnect learns the stored seq in the answer to its hello.
    ws = await open_agent(dashboard, agent_id, [election])
    assert await frame(ws) == {"type": "ack", "seq": 2}
    await ws.close()


async def test_bad_frames_get_a_named_error_and_abuse_closes(dashboard: LiveDashboard) -> None:
    agent_id = f"a-{uuid.uuid4().hex[:8]}"
    ws = await connect(
        dashboard.ws_agent,
        additional_headers={"Authorization": f"Bearer {dashboard.token(agent_id)}"},
        max_size=None,
    )
    cases = [
        ("not json", "bad-json"),
        ("[1, 2]", "bad-frame"),
        ('{"type": "gossip"}', "unknown-type"),
        ('{"type": "heartbeat", "at": "2026-01-01T00:00:00Z"}', "hello-first"),
        (json.dumps({"type": "hello", "agent": agent_id, "elections": "many"}), "invalid"),
        ("x" * (protocol.MAX_FRAME_BYTES + 1), "too-large"),
    ]
    for text, code in cases:
        await ws.send(text)
        reply = await frame(ws)
        assert (reply["type"], reply["code"]) == ("error", code), reply
        assert reply["message"]
    for _ in range(protocol.MAX_ERRORS - len(cases)):
        await ws.send("{")
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await ws.recv()
    assert info.value.rcvd.code == protocol.CLOSE_ABUSE


async def test_events_for_an_election_the_agent_is_not_a_member_of_are_refused(
    dashboard: LiveDashboard,
) -> None:
    agent_id = f"a-{uuid.uuid4().hex[:8]}"
    ws = await open_agent(dashboard, agent_id, [])
    await frame(ws)
    name = f"undeclared/{uuid.uuid4().hex[:6]}"
    await ws.send(json.dumps({"type": "events", "items": [event(1, name, leader=agent_id)]}))
    reply = await frame(ws)
    assert reply["type"] == "error" and reply["code"] == "not-a-member"
    assert name in reply["message"]
    # Answered (it must not come back from the spool forever), but neither stored nor applied.
    assert await frame(ws) == {"type": "ack", "seq": 1}
    await ws.close()
    out = dashboard.shell(
        "from elections.models import Election, Transition, AuditEntry; "
        f"print(Election.objects.filter(name={name!r}).exists(), "
        f"Transition.objects.filter(agent_id={agent_id!r}).count(), "
        f"AuditEntry.objects.filter(actor={agent_id!r}, action='events-refused').count())",
    )
    assert out == "False 0 1"


async def test_a_revoked_agent_is_disconnected_at_once_and_refused(
    dashboard: LiveDashboard,
) -> None:
    agent_id = f"a-{uuid.uuid4().hex[:8]}"
    token = dashboard.token(agent_id)
    ws = await open_agent(dashboard, agent_id, [f"rev/{agent_id}"], token=token)
    assert (await frame(ws))["type"] == "ack"
    assert "revoked 1 token(s)" in dashboard.manage("revoke_agent_token", agent_id)
    reply = await frame(ws, timeout=5)
    assert (reply["type"], reply["code"]) == ("error", "token-revoked")
    with pytest.raises(ConnectionClosed) as info:
        await ws.recv()
    assert info.value.rcvd.code == protocol.CLOSE_WRONG_AGENT
    with pytest.raises(InvalidStatus):
        await open_agent(dashboard, agent_id, [], token=token)


async def test_out_of_range_values_get_an_error_not_a_crash(dashboard: LiveDashboard) -> None:
    agent_id = f"a-{uuid.uuid4().hex[:8]}"
    ws = await open_agent(dashboard, agent_id, [f"range/{agent_id}"])
    await frame(ws)
    bad = [
        {"type": "events", "items": [event(2**70, f"range/{agent_id}")]},
        {"type": "events", "items": [event(1, f"range/{agent_id}", token=2**63)]},
        {
            "type": "events",
            "items": [{**event(1, f"range/{agent_id}"), "at": "2026-11-01T12:00:00"}],
        },
        {
            "type": "heartbeat",
            "at": "2026-11-01T12:00:00Z",
            "states": {f"range/{agent_id}": {"state": "leader", "ttl_left": "Infinity"}},
        },
    ]
    for item in bad:
        await ws.send(json.dumps(item).replace('"Infinity"', "Infinity"))
        reply = await frame(ws)
        assert (reply["type"], reply["code"]) == ("error", "invalid"), reply
    # The socket still works.
    await ws.send(json.dumps({"type": "events", "items": [event(1, f"range/{agent_id}")]}))
    assert await frame(ws) == {"type": "ack", "seq": 1}
    await ws.close()


async def test_the_election_limit_holds_per_agent_not_per_hello(dashboard: LiveDashboard) -> None:
    agent_id = f"a-{uuid.uuid4().hex[:8]}"
    token = dashboard.token(agent_id)
    half = protocol.MAX_ELECTIONS_PER_AGENT // 2 + 1
    first = [f"lim/{agent_id}/{i}" for i in range(half)]
    ws = await open_agent(dashboard, agent_id, first, token=token)
    assert (await frame(ws))["type"] == "ack"
    second = [f"lim/{agent_id}/x{i}" for i in range(half)]
    await ws.send(
        json.dumps(
            {
                "type": "hello",
                "agent": agent_id,
                "elections": [{"name": n, "backend": "raft", "ttl": 1} for n in second],
            }
        )
    )
    reply = await frame(ws)
    assert (reply["type"], reply["code"]) == ("error", "too-many-elections")
    await ws.close()
    count = dashboard.shell(
        f"from elections.models import Membership; "
        f"print(Membership.objects.filter(agent_id={agent_id!r}).count())",
    )
    assert count == str(half)


async def test_a_flooding_agent_is_closed_without_slowing_the_others(
    dashboard: LiveDashboard,
) -> None:
    flooder_id, other_id = (f"{x}-{uuid.uuid4().hex[:6]}" for x in ("flood", "calm"))
    flooder = await open_agent(dashboard, flooder_id, [])
    other = await open_agent(dashboard, other_id, [f"calm/{other_id}"])
    await frame(flooder)
    await frame(other)
    beat = json.dumps({"type": "heartbeat", "at": "2026-11-01T12:00:00Z", "states": {}})

    async def flood() -> int:
        sent = 0
        with contextlib.suppress(ConnectionClosed):
            for _ in range(10_000):
                await flooder.send(beat)
                sent += 1
        return sent

    async def calm() -> list[float]:
        latencies = []
        for seq in range(1, 21):
            started = time.monotonic()
            item = event(seq, f"calm/{other_id}", to="follower", token=None)
            await other.send(json.dumps({"type": "events", "items": [item]}))
            assert await frame(other) == {"type": "ack", "seq": seq}
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.02)
        return latencies

    _, latencies = await asyncio.gather(flood(), calm())
    codes = []
    with contextlib.suppress(ConnectionClosed):
        while True:
            codes.append(json.loads(await asyncio.wait_for(flooder.recv(), 5)).get("code"))
    assert "rate-limited" in codes
    assert flooder.close_code == protocol.CLOSE_RATE_LIMITED
    assert max(latencies) < 1.0, f"the calm agent's acks took up to {max(latencies):.2f}s"
    await other.close()
