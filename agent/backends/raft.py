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
  leader hands over only to one that said so, asked once more as it steps down; when none
  can, it tells the voters the seat is free, and the first back in the race campaigns at once;
- every RPC has its own timeout, and the leader is known even when some peers are down.

Peer RPC: one JSON line each way over TCP, authenticated. The fencing token is the term.

Peers authenticate each other
-----------------------------
Anyone who reached a member's port could otherwise depose the leader with one ``append`` of
a higher term. The members of an election share a secret (``secret``, or ``secret_file``
relative to the config file; required). Every message, both ways, carries an HMAC-SHA256 of
its canonical JSON (sorted keys, no spaces), keyed by HMAC(secret, election name), and names
the election: a message neither verifies under another secret nor counts in another election.

Identity: peers are configured by address, so a member *is* the address it listens on, as
written in the others' ``peers`` (write ``listen`` the same way, since that is how a node
introduces itself). A request names its sender's address in ``from`` and is refused, even
correctly signed, unless that address is one of our peers: a member taken off the list, or
another cluster that reused the secret, gets nowhere. A reply must come from the address we
dialled and answer our request's nonce. The agent id a message carries is what the runner
and the dashboard show; the secret is what makes it a member. Anyone holding the secret is a
member: keep it to the election's agents.

Replay: requests carry the sender's wall-clock time and a random nonce; one more than
``MAX_SKEW`` (30 s) off our clock is refused, and so is a nonce already seen within that
window. A replayed heartbeat would otherwise keep a follower loyal to a dead leader, and a
replayed TimeoutNow start a second transfer campaign; terms do the rest (an older term changes
nothing). A per-sender counter would not do: each RPC has its own connection, so messages
legitimately overtake each other. Members' clocks must agree within 30 s. A node that just
restarted has an empty nonce cache, so a message captured in the last 30 s can be replayed to
it once: at worst it hears of a leader it would hear from anyway, or holds back its vote for
one election timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import secrets
import time
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agent.backends.base import Backend, BackendOptions, Lease, Seat
from agent.backends.errors import Lost, Misconfigured
from agent.durations import Duration

log = logging.getLogger(__name__)

MAX_LINE = 4096
#: Requests whose timestamp is further than this (seconds) from our clock are refused.
MAX_SKEW = 30.0
#: Shorter secrets are refused: the secret is all that keeps strangers out.
MIN_SECRET = 16
#: A refused peer is logged at most this often (seconds), per peer and reason.
COMPLAIN_EVERY = 30.0


def canonical(body: dict[str, Any]) -> bytes:
    """The bytes a message's MAC covers: its JSON with sorted keys and no spaces."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


class PeerAuth:
    """Signs and checks the peer messages of one election (see the module docstring)."""

    def __init__(self, secret: bytes, election: str) -> None:
        label = b"electorate raft peers\0" + election.encode()
        self._key = hmac.new(secret, label, hashlib.sha256).digest()
        #: Nonces of admitted requests, oldest first, with when they may be forgotten.
        self._seen: OrderedDict[str, float] = OrderedDict()

    def _mac(self, body: dict[str, Any]) -> str:
        return hmac.new(self._key, canonical(body), hashlib.sha256).hexdigest()

    def seal(self, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` with a timestamp, a nonce and the MAC over all of it."""
        sealed = {**body, "ts": int(time.time() * 1000), "nonce": secrets.token_hex(12)}
        sealed["mac"] = self._mac(sealed)
        return sealed

    def signed(self, message: dict[str, Any]) -> bool:
        mac = message.get("mac")
        body = {k: v for k, v in message.items() if k != "mac"}
        return isinstance(mac, str) and hmac.compare_digest(mac, self._mac(body))

    def fresh(self, message: dict[str, Any]) -> bool:
        """Within the clock window and never seen before; remembers it (call last)."""
        ts, nonce = message.get("ts"), message.get("nonce")
        if not isinstance(ts, int) or not isinstance(nonce, str):
            return False
        if abs(time.time() - ts / 1000) > MAX_SKEW:
            return False
        now = time.monotonic()
        while self._seen and next(iter(self._seen.values())) < now:
            self._seen.popitem(last=False)
        if nonce in self._seen:
            return False
        # Kept for two windows: by then a replay is outside the clock window anyway.
        self._seen[nonce] = now + 2 * MAX_SKEW
        return True


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
    #: The secret every member of this election shares (or ``secret_file``; one is required).
    secret: SecretStr | None = None
    #: A file holding the secret, relative to the config file.
    secret_file: str | None = None
    _secret: bytes = PrivateAttr(default=b"")

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        from agent.config import parse_host_port

        parse_host_port(value)
        return value

    @field_validator("secret_file")
    @classmethod
    def _secret_path(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Resolve against the config file's directory (like ``token_file``), and read it."""
        if value is None:
            return None
        path = Path(value).expanduser()
        base = (info.context or {}).get("config_dir")
        if not path.is_absolute() and base is not None:
            path = Path(base) / path
        try:
            path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
        return str(path)

    @model_validator(mode="after")
    def _load_secret(self) -> RaftOptions:
        if self.secret_file is not None:
            self._secret = Path(self.secret_file).read_bytes().strip()
        elif self.secret is not None:
            self._secret = self.secret.get_secret_value().encode()
        return self

    def shared_secret(self) -> bytes:
        return self._secret


class RaftBackend(Backend, name="raft", options=RaftOptions, notifies=True):
    @classmethod
    def check_options(cls, options: RaftOptions, ttl: float) -> tuple[str, str] | None:
        from agent.config import parse_host_port

        if options.heartbeat * 2 > options.election_timeout:
            return "heartbeat", "must be at most half of election_timeout"
        if options.secret is not None and options.secret_file is not None:
            return "secret_file", "give secret or secret_file, not both"
        if options.secret is None and options.secret_file is None:
            return (
                "secret",
                "required (or secret_file): the members of a raft election authenticate "
                "each other with a secret they share",
            )
        if len(options.shared_secret()) < MIN_SECRET:
            field = "secret" if options.secret is not None else "secret_file"
            return field, f"the secret must be at least {MIN_SECRET} characters long"
        for i, peer in enumerate(options.peers):
            try:
                parse_host_port(peer.address)
            except ValueError as exc:
                return f"peers[{i}]", str(exc)
        return None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from agent.config import parse_host_port

        opts: RaftOptions = self.options
        me = parse_host_port(opts.listen)
        self.node = RaftNode(
            election=self.election,
            node_id=self.agent_id,
            listen=opts.listen,
            peers=[p for p in opts.peers if parse_host_port(p.address) != me],
            secret=opts.shared_secret(),
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
        secret: bytes,
    ) -> None:
        from agent.config import parse_host_port

        self.election = election
        self.id = node_id
        self.listen = parse_host_port(listen)
        #: How this node names itself to its peers: its own entry in their ``peers``.
        self.address = f"{self.listen[0]}:{self.listen[1]}"
        self.auth = PeerAuth(secret, election)
        self._complained: dict[tuple[str, str], float] = {}
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
        campaign would bump the term and depose it. After a silent one the others elect a
        leader after their election timeout. When nobody can take over now (all hold off, or
        refused), the voters are told the seat is free, so that the first whose hold-off ends
        campaigns at once rather than an election timeout later.
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
            reply = await self._rpc(target, {"type": "timeout_now", "term": term})
            if reply is None or reply.get("ok") or self.term != term:
                return
        # Nobody took the seat: there is no lease left to back, so no vote stays pledged.
        self.voted_at, self.voted_candidate = -1e9, None
        voters = [a for a in self.peers if self.peer_voter[a]]
        await asyncio.gather(*(self._rpc(a, {"type": "resigned", "term": term}) for a in voters))

    async def _ready_voters(self, term: int) -> list[tuple[str, int]]:
        """Voters that may campaign now: a heartbeat round, cut short by the first that says
        so (a peer that is down costs nothing), then the last regular round's."""
        message = {"type": "append", "term": term}
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
        message = {"type": "vote", "term": term, "pre": pre, "transfer_from": transfer_from}
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
        message = {"type": "append", "term": term}
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
        request = self.auth.seal(
            {**message, "election": self.election, "from": self.address, "id": self.id}
        )
        writer = None
        try:
            async with asyncio.timeout(self.rpc_timeout):
                reader, writer = await asyncio.open_connection(*address, limit=MAX_LINE)
                writer.write(canonical(request) + b"\n")
                await writer.drain()
                line = await reader.readline()
            reply = json.loads(line)
        except (OSError, TimeoutError, ValueError):
            return None
        finally:
            if writer is not None:
                writer.close()
        if not isinstance(reply, dict):
            return None
        problem = self._reply_problem(reply, request, address)
        if problem is not None:
            self._complain(f"{address[0]}:{address[1]}", problem)
            return None
        self.peer_ids[address] = reply["id"]
        return reply

    def _reply_problem(
        self, reply: dict[str, Any], request: dict[str, Any], address: tuple[str, int]
    ) -> str | None:
        from agent.config import parse_host_port

        if "error" in reply and "mac" not in reply:
            return f"it refused our request: {reply['error']}"
        if not self.auth.signed(reply):
            return "its answer is not signed with our secret (is the secret the same on both?)"
        try:
            sender = parse_host_port(str(reply.get("from")))
        except ValueError:
            sender = None
        if sender != address or reply.get("re") != request["nonce"]:
            return "its answer does not answer our request"
        if reply.get("election") != self.election or not isinstance(reply.get("id"), str):
            return "its answer is malformed"
        return None

    def _request_problem(self, request: Any) -> str | None:
        """Why a request is refused (see the module docstring), or None to handle it."""
        from agent.config import parse_host_port

        if not isinstance(request, dict):
            return "bad request"
        if not self.auth.signed(request):
            return "not signed with this election's secret"
        if request.get("election") != self.election:
            return f"this node serves election {self.election!r}"
        try:
            sender = parse_host_port(str(request.get("from")))
        except ValueError:
            sender = None
        if sender not in self.peer_voter or not isinstance(request.get("id"), str):
            return "the sender is not one of this election's peers"
        if not self.auth.fresh(request):  # last: only admitted requests use up their nonce
            return "stale or replayed"
        return None

    def _complain(self, peer: str, problem: str) -> None:
        """Log a refused exchange, at most once per COMPLAIN_EVERY for each peer and reason."""
        now = time.monotonic()
        if now - self._complained.get((peer, problem), -COMPLAIN_EVERY) >= COMPLAIN_EVERY:
            self._complained[(peer, problem)] = now
            log.warning("raft %s: refused an exchange with %s: %s", self.election, peer, problem)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request: Any = None
        try:
            async with asyncio.timeout(self.rpc_timeout * 2):
                line = await reader.readline()
            request = json.loads(line)
        except (ValueError, TimeoutError, asyncio.LimitOverrunError, OSError):
            pass
        problem = self._request_problem(request)
        if problem is not None:
            peer = writer.get_extra_info("peername")
            self._complain(str(peer[0]) if peer else "a peer", problem)
            reply: dict[str, Any] = {"error": problem}  # unsigned: nothing to trust in it
        else:
            reply = self._handle(request)
            reply.setdefault("term", self.term)
            reply.update(
                election=self.election, id=self.id, re=request["nonce"], **{"from": self.address}
            )
            reply = self.auth.seal(reply)
        with contextlib.suppress(OSError):
            writer.write(canonical(reply) + b"\n")
            await writer.drain()
            writer.close()

    def _handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """An authenticated request: ``id`` names the member that sent it."""
        from agent.config import parse_host_port

        term = request.get("term")
        if not isinstance(term, int):
            return {"error": "bad term"}
        sender = request["id"]
        kind = request.get("type")
        if kind == "append":
            return self._on_append(term, sender)
        if kind == "vote":
            if not self.peer_voter[parse_host_port(request["from"])]:
                return {"granted": False}  # no_vote members never campaign
            transfer_from = request.get("transfer_from")
            return self._on_vote(
                term,
                sender,
                bool(request.get("pre")),
                transfer_from if isinstance(transfer_from, str) else None,
            )
        if kind == "timeout_now":
            return self._on_timeout_now(term, sender)
        if kind == "resigned":
            return self._on_resigned(term, sender)
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

    def _on_resigned(self, term: int, leader: str) -> dict[str, Any]:
        """The leader we follow gave the seat up with nobody to take it: no stickiness to
        honour, no vote pledged to it, and our election timeout is over, so we campaign
        once we may."""
        if term != self.term or self.role != "follower" or leader != self.leader_id:
            return {"ok": False}
        self.leader_id, self.last_heard, self._deadline = None, -1e9, time.monotonic()
        if self.voted_candidate == leader:  # its lease, which our vote backed, is given up
            self.voted_at = -1e9
        self._kick.set()
        self._notify()
        return {"ok": True}

    def _may_campaign(self) -> bool:
        return self.eligible and not self.no_vote

    def _on_timeout_now(self, term: int, sender: str | None) -> dict[str, Any]:
        if term < self.term or not self._may_campaign() or sender is None:
            return {"ok": False}
        asyncio.get_running_loop().create_task(self._campaign(pre_vote=False, transfer_from=sender))
        return {"ok": True}
