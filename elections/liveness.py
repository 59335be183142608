"""Liveness and lease renewals, written for every agent of a process in one go.

A fleet of 5,000 agents sends 1,667 heartbeats a second; written one by one that would keep
a small database busy doing nothing new. The agent consumers record here who was seen when
and which leases were renewed; ``flush`` writes it all with a fixed number of statements,
once a second (``Flusher``), and re-derives the status of elections whose renewed leader
leases disagree with their stored status (a split brain that only renewals reveal).

A flush may run after an agent's socket closed: the agent row is written only while its
``session`` is still the one that was seen, and a disconnect clears the session, so a late
flush cannot bring a gone agent back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from elections import statuses
from elections.broadcast import elections_changed
from elections.db import run_db
from elections.models import Agent, Election, Membership
from elections.per_loop import PerLoop
from elections.sql import update_from_values

log = logging.getLogger(__name__)

#: Seconds between flushes: the delay before a renewed lease shows on the map.
FLUSH_EVERY = 1.0


@dataclass(frozen=True)
class Seen:
    """An agent's last heartbeat: its session, when, and its clock skew (``elections.clock``)."""

    session: str
    at: datetime
    skew: float | None = None
    #: The skew crossed the warning threshold since the last flush: redraw its elections.
    skew_flipped: bool = False


@dataclass
class Pending:
    """What was seen since the last flush."""

    #: agent id -> its last heartbeat
    seen: dict[str, Seen] = field(default_factory=dict)
    #: membership id -> (election id, lease expiry, claims the seat)
    leases: dict[int, tuple[int, datetime | None, bool]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.seen or self.leases)


class Liveness:
    """The process's buffer of pending liveness, filled by consumers on the event loop."""

    def __init__(self) -> None:
        self.pending = Pending()

    def seen(
        self,
        agent_id: str,
        session: str,
        at: datetime,
        skew: float | None = None,
        skew_flipped: bool = False,
    ) -> None:
        self.pending.seen[agent_id] = _merge(
            self.pending.seen.get(agent_id), Seen(session, at, skew, skew_flipped)
        )

    def lease(
        self, member_id: int, election_id: int, expires: datetime | None, claims: bool
    ) -> None:
        self.pending.leases[member_id] = (election_id, expires, claims)

    def forget(self, agent_id: str, member_ids: list[int]) -> None:
        self.pending.seen.pop(agent_id, None)
        for member_id in member_ids:
            self.pending.leases.pop(member_id, None)

    def take(self) -> Pending:
        pending, self.pending = self.pending, Pending()
        return pending


def _merge(older: Seen | None, newer: Seen) -> Seen:
    """The newer sighting, remembering a threshold crossing the older one had to announce."""
    if older is not None and older.skew_flipped and not newer.skew_flipped:
        return Seen(newer.session, newer.at, newer.skew, True)
    return newer


def flush(pending: Pending) -> list[int]:
    """Write what was seen; return the elections whose status changed."""
    with transaction.atomic():
        return _flush(pending)


def _flush(pending: Pending) -> list[int]:
    ids = sorted(pending.seen)
    # Rare: an agent marked stale by the sweep while its socket lived on comes back.
    revived = [
        agent_id
        for agent_id, session in Agent.objects.filter(pk__in=ids, connected=False).values_list(
            "pk", "session"
        )
        if session and session == pending.seen[agent_id].session
    ]
    seen = [(a, pending.seen[a]) for a in ids]
    update_from_values(
        Agent,
        ["id", "session"],
        ["last_seen", "connected", "clock_skew"],
        [(a, s.session, s.at, True, s.skew) for a, s in seen if s.skew is not None],
    )
    update_from_values(  # sightings without a skew sample (none yet) keep the stored one
        Agent,
        ["id", "session"],
        ["last_seen", "connected"],
        [(a, s.session, s.at, True) for a, s in seen if s.skew is None],
    )
    # The same statement notes that each agent still reports these elections (zombies).
    now = timezone.now()
    update_from_values(
        Membership,
        ["id"],
        ["lease_expires", "reported"],
        [
            (member_id, expires, now)
            for member_id, (_, expires, _) in sorted(pending.leases.items())
        ],
    )
    claims = {election_id for election_id, _, claims in pending.leases.values() if claims}
    suspects = _disagreeing(claims) if claims else set()
    back: set[int] = set()
    # Rare too: agents that came back, or whose clock skew crossed the warning threshold.
    redraw = revived + [a for a, s in seen if s.skew_flipped]
    if redraw:
        back = set(
            Membership.objects.filter(agent_id__in=redraw).values_list("election_id", flat=True)
        )
    flipped = statuses.refresh(suspects | back) if suspects | back else []
    elections_changed(back | set(flipped))
    return flipped


def _disagreeing(election_ids: set[int]) -> set[int]:
    """Elections whose claimants no longer match their stored status (two queries)."""
    found = statuses.claimants(election_ids, timezone.now())
    return {
        pk
        for pk, status, leader_id in Election.objects.filter(pk__in=election_ids).values_list(
            "pk", "status", "leader_id"
        )
        if statuses.status_of(leader_id, found.get(pk, ())) != status
    }


class Flusher:
    """Flushes one process's ``Liveness`` every ``FLUSH_EVERY`` seconds, off the event loop."""

    def __init__(self, liveness: Liveness) -> None:
        self.liveness = liveness
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="liveness")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            pending = self.liveness.take()
            if not pending:
                continue
            try:
                await run_db(flush, pending)
            except Exception:
                # The database is away: keep the newest of what was seen for the next try.
                log.exception("could not write agents' liveness; retrying")
                newer = self.liveness.take()
                for agent_id, seen in newer.seen.items():
                    pending.seen[agent_id] = _merge(pending.seen.get(agent_id), seen)
                pending.leases.update(newer.leases)
                self.liveness.pending = pending

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _flushing() -> Liveness:
    buffer = Liveness()
    Flusher(buffer).start()
    return buffer


#: The buffer of the running event loop (one per server process), flushing itself.
liveness = PerLoop(_flushing)
