"""Raft-style election between agents, with no external service (goelect's design, fixed).

Followers, candidates, a leader; terms; a randomized election timeout in [T, 2T]; one vote
per term; a majority of *voting* members wins; ``no_vote`` members follow but never vote or
lead. Beyond goelect:

- pre-vote: a node first asks whether it *could* win, without bumping anyone's term, so a
  node returning from a partition does not depose a healthy leader; answers that come back
  after the node voted, moved to a newer term or heard a leader are dropped;
- leader stickiness: a voter that heard from a leader within T refuses votes (except for a
  leadership transfer), and the leader keeps its lease only while a majority acked a
  heartbeat round within T of that round's *start*; so the old leader's lease has always
  run out before a majority can elect another (self-fencing, no split brain);
- leadership transfer (``TimeoutNow``): a resigning leader tells a successor to campaign at
  once, so handover takes one round trip rather than an election timeout. Followers say in
  every heartbeat ack whether they may campaign (not while their runner holds off), and the
  leader hands over only to one that said so, asked once more as it steps down;
- every RPC has its own timeout, and the leader is known even when some peers are down.

Peer RPC: one JSON line each way over TCP. The fencing token is the term.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from typing import Annotated, Any

from pydantic import BeforeValidator, field_validator

from agent.backends.base import Backend, BackendOptions, Lease, Lost, Misconfigured, Seat
from agent.durations import Duration

log = logging.getLogger(__name__)

MAX_LINE = 4096


class Peer(BackendOptions):
    address: str
    no_vote: bool = False


def _peer(value: Any) -> Any:
    return {"address": value} if isinstance(value, str) else value


class RaftOptions(BackendOptions):
    listen: str
    peers: list[Annotated[Peer, BeforeValidator(_peer)]] = []
    heartbeat: Duration = 0.2
    election_timeout: Duration = 1.0
    no_vote: bool = False
    rpc_timeout: Duration | None = None

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        from agent.config import parse_host_port

        parse_host_port(value)
        return value


class RaftBackend(Backend):
    name = "raft"
    Options = RaftOptions
    notifies = True

    @classmethod
    def check_options(cls, options: RaftOptions, ttl: float) -> tuple[str, str] | None:
        from agent.config import parse_host_port

        if options.heartbeat * 2 > options.election_timeout:
            return "heartbeat", "must be at most half of election_timeout"
        for i, peer in enumerate(options.peers):
            try:
                parse_host_port(peer.address)
            except ValueError as exc:
                return f"peers[{i}]", str(exc)
        return None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        opts: RaftOptions = self.options
        self.node = RaftNode(
            election=self.election,
            node_id=self.agent_id,
            listen=opts.listen,
            peers=[p for p in opts.peers if p.address != opts.listen],
            heartbeat=opts.heartbeat,
            election_timeout=opts.election_timeout,
            no_vote=opts.no_vote,
            rpc_timeout=opts.rpc_timeout or opts.heartbeat,
        )

    @property
    def renew_interval(self) -> float:
        return self.node.heartbeat

    @property
    def retry_interval(self) -> float:
        return self.node.election_timeout

    async def open(self) -> None:
        try:
            await self.node.start()
        except OSError as exc:
            raise Misconfigured(f"cannot listen on {self.options.listen}: {exc.strerror}") from None

    async def campaign(self) -> Lease | None:
        if not self.node.eligible:
            self.node.eligible = True
            self.node._kick.set()  # back in the race: campaign now if the seat is empty
        return self.node.lease()

    def hold(self) -> None:
        # Out of the race until the runner campaigns again: no campaign of the node's own, no
        # handover accepted, and heartbeat acks say so.
        self.node.eligible = False

    async def renew(self, lease: Lease) -> Lease:
        current = self.node.lease()
        if current is None or current.token != lease.token:
            raise Lost(f"no longer leader of term {lease.token}")
        return current

    async def resign(self, lease: Lease) -> None:
        await self.transfer(lease, None)

    async def transfer(self, lease: Lease, successor: str | None) -> bool:
        await self.node.step_down(successor)
        return True

    async def observe(self) -> Seat:
        self.node.mark_read()
        return Seat(self.node.known_leader(), self.node.term)

    async def wait_for_change(self, timeout: float) -> None:
        await self.node.wait_changed(timeout)

    async def close(self) -> None:
        await self.node.stop()


class RaftNode:
    """The protocol state machine and its TCP server."""

    def __init__(
        self,
        *,
        election: str,
        node_id: str,
        listen: str,
        peers: list[Peer],
        heartbeat: float,
        election_timeout: float,
        no_vote: bool,
        rpc_timeout: float,
    ) -> None:
        from agent.config import parse_host_port

        self.election = election
        self.id = node_id
        self.listen = parse_host_port(listen)
        self.peers = [parse_host_port(p.address) for p in peers]
        self.peer_voter = {parse_host_port(p.address): not p.no_vote for p in peers}
        self.heartbeat = heartbeat
        self.election_timeout = election_timeout
        self.no_vote = no_vote
        self.rpc_timeout = rpc_timeout
        voters = sum(self.peer_voter.values()) + (0 if no_vote else 1)
        self.quorum = voters // 2 + 1

        self.term = 0
        self.voted_for: str | None = None
        self.role = "follower"
        self.leader_id: str | None = None
        self.last_heard = -1e9  # monotonic time of the last valid leader heartbeat
        #: When this node last granted a vote, and to whom: it grants no other vote within T,
        #: whatever the term, so a leader's lease (ballot start + T) outlives its voters' loyalty.
        self.voted_at = -1e9
        self.voted_candidate: str | None = None
        #: Peers that acked the last heartbeat round, and whether each said it may campaign.
        self.acked: dict[tuple[str, int], bool] = {}
        self.lease_until = 0.0
        #: Campaign only when the runner asks (it holds off after a resign).
        self.eligible = False
        self.peer_ids: dict[tuple[str, int], str] = {}
        self._changed = asyncio.Event()
        self._kick = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._deadline = 0.0

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        host, port = self.listen
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_LINE)
        self._reset_deadline()
        self._task = asyncio.create_task(self._loop(), name=f"raft {self.election}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._server:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)

    # -- what the backend reads ---------------------------------------------------------

    def lease(self) -> Lease | None:
        if self.role == "leader" and time.monotonic() < self.lease_until:
            return Lease(self.term, self.lease_until)
        return None

    def known_leader(self) -> str | None:
        if self.role == "leader":
            return self.id if self.lease() else None
        if self.leader_id and time.monotonic() - self.last_heard < self.election_timeout * 2:
            return self.leader_id
        return None

    def mark_read(self) -> None:
        """The caller is about to read the state: later changes will wake ``wait_changed``."""
        self._changed.clear()

    async def wait_changed(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()

    async def step_down(self, successor: str | None) -> None:
        """Stop leading; hand over to ``successor``, or to a follower that can take the seat now.

        The candidates are the voters that say, in a heartbeat sent right now, that they may
        campaign (a member whose runner holds off, e.g. after its own step-down, says it may
        not), fastest first, then those that said so in the last regular round. A candidate
        that refuses TimeoutNow is followed by the next; one that does not answer is not:
        the message may have arrived and the candidate be campaigning, and a second transfer
        campaign would bump the term and depose it. With no candidate, or after a silent one,
        the others elect a leader after their election timeout.
        """
        if self.role != "leader":
            return
        term = self.term
        named = [a for a, ident in self.peer_ids.items() if ident == successor]
        targets = named[:1] if named else await self._ready_voters(term)
        if self.role != "leader" or self.term != term:
            return  # a newer term turned up meanwhile
        self._become_follower(term, None)
        self.eligible = False
        for target in targets:
            # Our vote is pledged to the successor for T: no rival can count on it meanwhile.
            self.voted_at, self.voted_candidate = time.monotonic(), self.peer_ids.get(target)
            reply = await self._rpc(target, {"type": "timeout_now", "term": term, "from": self.id})
            if reply is None or reply.get("ok") or self.term != term:
                return

    async def _ready_voters(self, term: int) -> list[tuple[str, int]]:
        """Voters that may campaign now: a heartbeat round, cut short by the first that says
        so (a peer that is down costs nothing), then the last regular round's."""
        message = {"type": "append", "term": term, "leader": self.id}
        voters = [a for a in self.peers if self.peer_voter[a]]
        calls = {asyncio.ensure_future(self._rpc(a, message)): a for a in voters}
        ready: list[tuple[str, int]] = []
        pending = set(calls)
        try:
            while pending and not ready:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for call in done:
                    reply = call.result()
                    if reply and reply.get("term", 0) > term:
                        self._become_follower(reply["term"], None)
                        return []
                    if reply and reply.get("ok") and reply.get("eligible"):
                        ready.append(calls[call])
        finally:
            for call in pending:
                call.cancel()
        ready += [a for a, eligible in self.acked.items() if eligible and a not in ready]
        return [a for a in ready if self.peer_voter[a]]

    # -- the timer loop -------------------------------------------------------------------

    def _reset_deadline(self) -> None:
        self._deadline = time.monotonic() + random.uniform(
            self.election_timeout, 2 * self.election_timeout
        )

    def _standing(self) -> tuple[Any, ...]:
        """What a pre-vote's answer depends on: the term, our vote, the leader we hear."""
        return (self.term, self.voted_for, self.voted_at, self.leader_id, self.last_heard)

    def _notify(self) -> None:
        self._changed.set()

    def _become_follower(self, term: int, leader: str | None) -> None:
        if term > self.term:
            self.term, self.voted_for = term, None
        was_leader = self.role == "leader"
        self.role = "follower"
        self.leader_id = leader
        self.lease_until = 0.0
        if was_leader or leader:
            self._notify()

    async def _loop(self) -> None:
        while True:
            if self.role == "leader":
                await self._lead_round()
                continue
            left = self._deadline - time.monotonic()
            if left > 0:
                self._kick.clear()
                # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that lands
                # as the kick arrives (a heartbeat), and stop() then waited forever.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._kick.wait()
                continue
            if not self._may_campaign():
                # Timed out while out of the race: stay timed out, so that the runner coming
                # back (campaign() kicks us) starts a campaign at once, not a timeout later.
                self._kick.clear()
                await self._kick.wait()
                continue
            self._reset_deadline()
            await self._campaign(pre_vote=True)

    async def _campaign(self, *, pre_vote: bool, transfer_from: str | None = None) -> None:
        if pre_vote:
            before = self._standing()
            if not await self._ballot(self.term + 1, pre=True, transfer_from=None):
                return
            # The answers took a round trip. If meanwhile this node voted, moved to a newer
            # term or heard a leader, they are stale: campaigning on them would depose the
            # leader that just won (seen after a partition healed).
            if self._standing() != before or self.role != "follower" or not self.eligible:
                return
        self.term += 1
        started = time.monotonic()
        self.voted_for, self.voted_candidate, self.voted_at = self.id, self.id, started
        self.role = "candidate"
        self.leader_id = None
        self._notify()
        term = self.term
        won = await self._ballot(term, pre=False, transfer_from=transfer_from)
        if won and self.role == "candidate" and self.term == term:
            self.role = "leader"
            self.leader_id = self.id
            # Every voter that granted refuses other candidates until at least `started + T`.
            self.lease_until = started + self.election_timeout
            self._notify()
            self._kick.set()  # start heartbeating now, not at the next timer tick
        elif self.role == "candidate":
            self.role = "follower"
            self._notify()

    async def _ballot(self, term: int, *, pre: bool, transfer_from: str | None) -> bool:
        message = {
            "type": "vote",
            "term": term,
            "candidate": self.id,
            "pre": pre,
            "transfer_from": transfer_from,
        }
        replies = await asyncio.gather(*(self._rpc(a, message) for a in self.peers))
        votes = 1
        for reply in replies:
            if not reply:
                continue
            if reply.get("term", 0) > self.term and not reply.get("granted"):
                self._become_follower(reply["term"], None)
                return False
            if reply.get("granted"):
                votes += 1
        return votes >= self.quorum

    async def _lead_round(self) -> None:
        started = time.monotonic()
        term = self.term
        message = {"type": "append", "term": term, "leader": self.id}
        replies = await asyncio.gather(*(self._rpc(a, message) for a in self.peers))
        if self.role != "leader" or self.term != term:
            return
        acks = 1
        self.acked = {
            a: bool(r.get("eligible"))
            for a, r in zip(self.peers, replies, strict=True)
            if r and r.get("ok")
        }
        for reply in replies:
            if not reply:
                continue
            if reply.get("term", 0) > term:
                self._become_follower(reply["term"], None)
                return
            if reply.get("ok") and reply.get("voter"):
                acks += 1
        if acks >= self.quorum:
            self.lease_until = max(self.lease_until, started + self.election_timeout)
        if time.monotonic() >= self.lease_until:
            log.warning("raft %s: lost quorum in term %s; stepping down", self.election, term)
            self._become_follower(term, None)
            return
        await asyncio.sleep(max(0.0, self.heartbeat - (time.monotonic() - started)))

    # -- RPC ----------------------------------------------------------------------------

    async def _rpc(
        self, address: tuple[str, int], message: dict[str, Any]
    ) -> dict[str, Any] | None:
        message = {**message, "election": self.election}
        writer = None
        try:
            async with asyncio.timeout(self.rpc_timeout):
                reader, writer = await asyncio.open_connection(*address, limit=MAX_LINE)
                writer.write(json.dumps(message).encode() + b"\n")
                await writer.drain()
                line = await reader.readline()
            reply = json.loads(line)
            if isinstance(reply, dict) and isinstance(reply.get("id"), str):
                self.peer_ids[address] = reply["id"]
                return reply
            return None
        except (OSError, TimeoutError, ValueError):
            return None
        finally:
            if writer is not None:
                writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.rpc_timeout * 2):
                line = await reader.readline()
            request = json.loads(line)
            reply = self._handle(request) if isinstance(request, dict) else {"error": "bad request"}
        except (ValueError, TimeoutError, asyncio.LimitOverrunError, OSError):
            reply = {"error": "bad request"}
        reply["id"] = self.id
        reply.setdefault("term", self.term)
        with contextlib.suppress(OSError):
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
            writer.close()

    def _handle(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("election") != self.election:
            return {"error": f"this node serves election {self.election!r}"}
        term = request.get("term")
        if not isinstance(term, int):
            return {"error": "bad term"}
        kind = request.get("type")
        if kind == "append":
            return self._on_append(term, str(request.get("leader")))
        if kind == "vote":
            return self._on_vote(
                term,
                str(request.get("candidate")),
                bool(request.get("pre")),
                request.get("transfer_from")
                if isinstance(request.get("transfer_from"), str)
                else None,
            )
        if kind == "timeout_now":
            sender = request.get("from")
            return self._on_timeout_now(term, sender if isinstance(sender, str) else None)
        return {"error": f"unknown type {kind!r}"}

    def _on_append(self, term: int, leader: str) -> dict[str, Any]:
        if term < self.term:
            return {"ok": False}
        if self.role != "follower" or self.leader_id != leader or term > self.term:
            self._become_follower(term, leader)
        self.last_heard = time.monotonic()
        self._reset_deadline()
        self._kick.set()
        return {"ok": True, "voter": not self.no_vote, "eligible": self._may_campaign()}

    def _on_vote(
        self, term: int, candidate: str, pre: bool, transfer_from: str | None
    ) -> dict[str, Any]:
        if self.no_vote:
            return {"granted": False, "voter": False}
        if self.role == "leader":
            return {"granted": False}  # a leader hands over only through its own step-down
        now = time.monotonic()
        # Leader stickiness: a healthy leader keeps its seat. A transfer overrides it only when
        # it was asked for by the very leader this node last heard from.
        handed_over = transfer_from is not None and transfer_from == self.leader_id
        if now - self.last_heard < self.election_timeout and not handed_over:
            return {"granted": False}
        # A vote granted within T (in any term) still backs that winner's lease, unless that
        # winner is the leader now handing over.
        backing = self.voted_candidate not in (candidate, transfer_from)
        if now - self.voted_at < self.election_timeout and backing:
            return {"granted": False}
        if term < self.term or (pre and term <= self.term):
            return {"granted": False}
        if pre:
            return {"granted": True}
        if term > self.term:
            self._become_follower(term, None)
        if self.voted_for in (None, candidate):
            self.voted_for, self.voted_candidate, self.voted_at = candidate, candidate, now
            self._reset_deadline()
            return {"granted": True}
        return {"granted": False}  # one vote per term

    def _may_campaign(self) -> bool:
        return self.eligible and not self.no_vote

    def _on_timeout_now(self, term: int, sender: str | None) -> dict[str, Any]:
        if term < self.term or not self._may_campaign() or sender is None:
            return {"ok": False}
        asyncio.get_running_loop().create_task(self._campaign(pre_vote=False, transfer_from=sender))
        return {"ok": True}
