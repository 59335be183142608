"""Every JSON shape the dashboard gives out, in one place: the API's answers, the command
record kept in the audit log, and the exported audit entries.

Times are full ISO 8601 with the zone (``iso``): an exported audit entry must hash to the
value stored, so no format here may round them.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from elections import clock, leases
from elections.models import Agent, AuditEntry, Command, Election, Membership, Term

if TYPE_CHECKING:
    from elections.commands import DryRun


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def lease_json(e: Election, members: list[Membership]) -> dict[str, Any] | None:
    """The leader's lease as its last heartbeat reported it (None: no leader claiming)."""
    m = next((m for m in members if m.agent_id == e.leader_id), None)
    if m is None or m.state != Membership.State.LEADER or m.lease_expires is None:
        return None
    return {
        "expires": iso(m.lease_expires),
        "renewed": iso(leases.renewed_at(m.lease_expires, e.ttl)),
        "ttl": e.ttl,
        "late": m.lease_late and not e.leader_unverified(),
    }


def election_json(e: Election) -> dict[str, Any]:
    """Expects ``leader`` selected and ``memberships__agent`` prefetched (the map's query)."""
    members = list(e.memberships.all())
    return {
        "name": e.name,
        "backend": e.backend,
        "labels": e.labels,
        "status": e.status,
        "leader": e.leader_id,
        "leader_connected": bool(e.leader and e.leader.connected),
        "token": e.token,
        "since": iso(e.leader_since),
        "leaderless_since": iso(e.leaderless_since) if e.leader_id is None else None,
        "held_claim": {
            "leader": e.suspect_leader,
            "token": e.suspect_token,
            "since": iso(e.suspect_since),
        }
        if e.suspect_token is not None
        else None,
        "paused": e.paused,
        "paused_until": iso(e.paused_until),
        "flapping": e.flapping_since is not None,
        "flapping_since": iso(e.flapping_since),
        "lease": lease_json(e, members),
        "members": [
            {
                "agent": m.agent_id,
                "state": m.state,
                "connected": m.agent.connected,
                "clock_skew": m.agent.clock_skew,
            }
            for m in members
        ],
    }


def term_json(t: Term) -> dict[str, Any]:
    return {
        "leader": t.leader_id,
        "token": t.token,
        "started": iso(t.started),
        "ended": iso(t.ended),
        "end_reason": t.end_reason or None,
        "gap": t.gap,
    }


def agent_json(a: Agent) -> dict[str, Any]:
    return {
        "id": a.id,
        "connected": a.connected,
        "hostname": a.hostname,
        "version": a.version,
        "last_seen": iso(a.last_seen),
        "last_seq": a.last_seq,
        "clock_skew": a.clock_skew,
        "clock_skewed": clock.skewed(a.clock_skew),
    }


def command_detail(command: Command) -> dict[str, Any]:
    """What the audit log keeps of a command at each step."""
    return {
        "command": command.pk,
        "kind": command.kind,
        "status": command.status,
        "leader": command.target_id,
        "successor": command.successor or None,
        "reason": command.reason,
        "forced": command.forced,
        "drill": command.drill,
        "token": command.old_token,
        "new_token": command.new_token,
        "new_leader": command.new_leader or None,
        "result": command.result or None,
        "scheduled_for": iso(command.scheduled_for),
        "gap": command.leaderless_gap,
    }


def command_json(command: Command) -> dict[str, Any]:
    return {
        "id": command.pk,
        "election": command.election.name,
        "requested_by": command.requested_by.get_username() if command.requested_by else None,
        "created": iso(command.created),
        "sent_at": iso(command.sent_at),
        "finished_at": iso(command.finished_at),
        **command_detail(command),
    }


def dry_run_json(run: DryRun) -> dict[str, Any]:
    """A step-down judged without being made: would it be sent, and who could take over."""
    return {
        "dry_run": True,
        "election": run.election,
        "kind": run.kind,
        "would": "refuse" if run.refused else "send",
        "refusal": run.refused.message if run.refused else None,
        "candidates": [
            {
                "agent": c.agent,
                "state": c.state or None,
                "connected": c.connected,
                "could_take_over": c.eligible,
                "why_not": list(c.reasons),
            }
            for c in run.candidates
        ],
    }


def audit_json(entry: AuditEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "at": iso(entry.at),
        "actor_type": entry.actor_type,
        "actor": entry.actor,
        "action": entry.action,
        "target": entry.target,
        "detail": entry.detail,
        "ip": entry.ip,
        "prev_hash": entry.prev_hash,
        "hash": entry.hash,
    }
