"""Who could take over an election now, and why each other member could not.

The one judgement the step-down service uses to accept a successor (or refuse with "no
healthy candidate") and that a dry run shows: the two can never disagree. One query.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.utils import timezone

from elections.models import Election, Membership
from elections.zombies import grace, with_zombie_flag

#: Member states that campaign when the seat is free.
CAMPAIGNING = (Membership.State.FOLLOWER, Membership.State.CANDIDATE)


@dataclass(frozen=True)
class Candidate:
    agent: str
    state: str
    connected: bool
    #: Why it could not take over; empty: it could.
    reasons: tuple[str, ...]

    @property
    def eligible(self) -> bool:
        return not self.reasons


def assess(election: Election, successor: str = "", now: datetime | None = None) -> list[Candidate]:
    """Every member of ``election`` (by agent id), plus ``successor`` when it is not one."""
    now = now or timezone.now()
    members = with_zombie_flag(election.memberships.select_related("agent"), now)
    found = [_judge(election, m, now) for m in members]
    if successor and successor not in {c.agent for c in found}:
        found.append(Candidate(successor, "", False, (f"not a member of {election.name}",)))
    return found


def eligible(candidates: list[Candidate]) -> list[Candidate]:
    return [c for c in candidates if c.eligible]


def _judge(election: Election, m: Membership, now: datetime) -> Candidate:
    reasons: list[str] = []
    if m.agent_id == election.leader_id:
        reasons.append("it is the leader")
    if not m.agent.connected:
        reasons.append("its agent is offline")
    if m.state == Membership.State.OBSERVER:
        reasons.append("observer: it never campaigns")
    elif m.state == Membership.State.NO_VOTE:
        reasons.append("no-vote: barred from leading (configured so, or holding off)")
    elif m.state == Membership.State.LEADER and m.agent_id != election.leader_id:
        reasons.append("it claims the seat itself")
    if m.no_failover:
        reasons.append("no_failover is set")
    if getattr(m, "zombie", False):
        reasons.append(
            f"its agent has not reported this election for over {grace().total_seconds():.0f}s "
            "(its view and lease are stale)"
        )
    if election.leader_id and m.agent_id != election.leader_id:
        behind = m.sees_token is not None and election.token is not None
        if (m.sees_leader and m.sees_leader != election.leader_id) or (
            behind and m.sees_token < election.token  # type: ignore[operator]
        ):
            reasons.append(
                f"it follows {m.sees_leader or 'nobody'} (token {m.sees_token}), not the "
                f"current leader {election.leader_id} (token {election.token})"
            )
    return Candidate(m.agent_id, m.state, m.agent.connected, tuple(reasons))
