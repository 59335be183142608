"""The command service: step-down and switchover, from request to confirmed result.

One way to do it: the UI button, the JSON API and the CLI all call ``request_stepdown``.
A command is *done* only when the old leader confirms it no longer holds the seat and a
newer fencing token is seen; one that gets no answer in time ends ``expired``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

import protocol
from elections import audit, candidates, delivery, layer, webhooks
from elections.broadcast import elections_changed
from elections.candidates import Candidate
from elections.db import submit
from elections.models import Command, Election
from elections.permissions import Refused, User, actor, require_operator
from elections.serializers import command_detail

#: The longest an agent is asked to stay out of the race (the protocol's own bound).
MAX_HOLD_OFF = 3600.0
#: Seconds an agent has to answer, on top of the hold-off and the election's TTL.
ANSWER_GRACE = 10.0


@dataclass(frozen=True)
class Request:
    election: str
    reason: str
    successor: str = ""
    force: bool = False
    drill: bool = False
    hold_off: float = 5.0
    at: datetime | None = None  # a scheduled switchover


def healthy_candidates(election: Election) -> list[Candidate]:
    """Members that could take over now (``elections.candidates``: the dry run's judgement)."""
    return candidates.eligible(candidates.assess(election))


@dataclass(frozen=True)
class DryRun:
    """What a step-down or switchover would do now: every member judged, and the refusal the
    real request would meet (None: it would be sent)."""

    election: str
    kind: str
    candidates: list[Candidate]
    refused: Refused | None


def dry_run(user: User, request: Request) -> DryRun:
    """Judge ``request`` exactly as ``request_stepdown`` would, writing and sending nothing
    (not audited: nothing changes)."""
    require_operator(user)
    election = Election.objects.select_related("leader").filter(name=request.election).first()
    if election is None:
        raise Refused(404, f"unknown election {request.election!r}")
    judged = candidates.assess(election, request.successor)
    try:
        _check(election, request, judged)
        refused = None
    except Refused as exc:
        refused = exc
    kind = Command.Kind.SWITCHOVER if request.successor else Command.Kind.STEP_DOWN
    return DryRun(election.name, kind, judged, refused)


def _check(election: Election, request: Request, judged: list[Candidate]) -> None:
    """Every refusal a request can meet once its election is known (raises Refused)."""
    if election.paused:
        raise Refused(409, f"{election.name} is paused for maintenance: {election.paused_reason}")
    if election.commands.filter(status__in=Command.IN_FLIGHT).exists():
        raise Refused(409, f"a command for {election.name} is already in progress")
    able = candidates.eligible(judged)
    if request.successor and request.force:
        return
    if request.successor and request.successor not in {c.agent for c in able}:
        why = next((c.reasons for c in judged if c.agent == request.successor), ())
        raise Refused(
            412,
            f"{request.successor} is not a healthy candidate in {election.name}: " + "; ".join(why),
        )
    if not able and not request.force:
        raise Refused(412, f"no healthy candidate could take over {election.name}; tick force")


def request_stepdown(user: User, request: Request, *, ip: str | None = None) -> Command:
    """Check, record and (on commit) send a step-down or switchover. Raises Refused."""
    who = actor(user)
    try:
        return _request(user, request, who, ip)
    except Refused as refused:
        audit.record(
            audit.Actor.USER,
            who,
            audit.Action.STEP_DOWN_REFUSED,
            request.election,
            {"reason": request.reason, "why": refused.message, "successor": request.successor},
            ip,
        )
        raise


@transaction.atomic
def _request(user: User, request: Request, who: str, ip: str | None) -> Command:
    require_operator(user)
    if not (math.isfinite(request.hold_off) and 0 <= request.hold_off <= MAX_HOLD_OFF):
        raise Refused(400, f"hold_off must be between 0 and {MAX_HOLD_OFF:.0f} seconds")
    election = (
        Election.objects.select_for_update(of=("self",))
        .select_related("leader")
        .filter(name=request.election)
    ).first()
    if election is None:
        raise Refused(404, f"unknown election {request.election!r}")
    if not request.reason.strip():
        raise Refused(400, "a reason is required")
    _check(election, request, candidates.assess(election, request.successor))
    kind = Command.Kind.SWITCHOVER if request.successor else Command.Kind.STEP_DOWN

    command = Command.objects.create(
        election=election,
        kind=kind,
        target=election.leader,
        successor=request.successor,
        requested_by=user if user.pk else None,
        reason=request.reason.strip()[:500],
        forced=request.force,
        drill=request.drill,
        hold_off=request.hold_off,
        status=Command.Status.SCHEDULED if request.at else Command.Status.PENDING,
        scheduled_for=request.at,
        old_token=election.token,
    )
    audit.record(
        audit.Actor.USER,
        who,
        audit.Action.SWITCHOVER_REQUESTED
        if request.successor
        else audit.Action.STEP_DOWN_REQUESTED,
        election.name,
        command_detail(command),
        ip,
    )
    if not request.at:
        _dispatch(command, election)
    elections_changed([election.pk])
    return command


def _dispatch(command: Command, election: Election) -> None:
    """Send now, or fail at once when the leader cannot be reached."""
    leader = election.leader
    if leader is None:
        _finish(command, Command.Status.FAILED, f"{election.name} has no leader to step down")
        return
    if not leader.connected:
        _finish(command, Command.Status.FAILED, f"the leader {leader.id} is offline")
        return
    if not layer.healthy():
        _finish(command, Command.Status.FAILED, _unreachable(leader.id))
        return
    command.target = leader
    command.old_token = election.token
    command.status = Command.Status.SENT
    command.sent_at = timezone.now()
    command.save(update_fields=["target", "old_token", "status", "sent_at"])
    frame = protocol.dump(
        protocol.Command(
            id=command.pk,
            kind=command.kind,
            election=election.name,
            successor=command.successor or None,
            hold_off=command.hold_off,
        )
    )
    others = []
    if command.kind == Command.Kind.SWITCHOVER:
        # The other members hold off first, so that the chosen successor wins the seat.
        others = list(
            election.memberships.filter(agent__connected=True)
            .exclude(agent_id=leader.id)
            .values_list("agent_id", flat=True)
        )
    targets = [*others, leader.id]
    pk = command.pk

    def failed(exc: Exception) -> None:
        submit(undeliverable, pk, _unreachable(leader.id))

    transaction.on_commit(lambda: delivery.send(frame, targets, failed))


def _unreachable(agent_id: str) -> str:
    return (
        f"cannot reach {agent_id}: the channel layer (Redis) is unavailable; "
        "try again once it is back"
    )


@transaction.atomic
def undeliverable(command_id: int, reason: str) -> None:
    """The command could not be handed to the channel layer: it fails now, with the reason."""
    command = (
        Command.objects.select_for_update(of=("self",))
        .select_related("election")
        .filter(pk=command_id, status=Command.Status.SENT)
        .first()
    )
    if command is not None:
        _finish(command, Command.Status.FAILED, reason)


#: The audit action of each way a command ends.
ENDED = {
    Command.Status.DONE: audit.Action.COMMAND_DONE,
    Command.Status.FAILED: audit.Action.COMMAND_FAILED,
    Command.Status.EXPIRED: audit.Action.COMMAND_EXPIRED,
    Command.Status.CANCELLED: audit.Action.COMMAND_CANCELLED,
}


def _finish(
    command: Command, status: Command.Status, result: str, *, by_agent: bool = False
) -> None:
    command.status = status
    command.result = result[:500]
    command.finished_at = timezone.now()
    command.save()
    by = audit.Actor.AGENT if by_agent else audit.Actor.SYSTEM
    audit.record(
        by,
        command.target_id if by_agent and command.target_id else "system",
        ENDED[status],
        command.election.name,
        command_detail(command),
    )
    _ended(command)


def _ended(command: Command) -> None:
    """A command reached its final status: wake its waiters, tell the map and the webhooks."""
    delivery.announce_final(command)
    webhooks.notify(webhooks.COMMAND, command.election.name, command_detail(command))
    elections_changed([command.election_id])


@transaction.atomic
def record_result(agent_id: str, result: protocol.Result) -> Command | None:
    """The agent answered. Only the command's target can finish it."""
    command = (
        Command.objects.select_for_update(of=("self",))
        .select_related("election")
        .filter(pk=result.command, target_id=agent_id, status=Command.Status.SENT)
        .first()
    )
    if command is None:
        return None  # a member that held off, a late or a foreign answer: nothing to finish
    command.new_token = result.token
    command.new_leader = result.leader or ""
    if command.drill:
        command.leaderless_gap = result.gap
    newer = result.token is not None and (
        command.old_token is None or result.token > command.old_token
    )
    if result.ok and newer and result.leader and result.leader != agent_id:
        _finish(command, Command.Status.DONE, result.detail, by_agent=True)
    else:
        detail = result.detail or "the agent reported a failure"
        _finish(command, Command.Status.FAILED, detail, by_agent=True)
    return command


@transaction.atomic
def cancel(user: User, command_id: int, ip: str | None = None) -> Command:
    require_operator(user)
    command = (
        Command.objects.select_for_update(of=("self",))
        .select_related("election")
        .filter(pk=command_id)
        .first()
    )
    if command is None:
        raise Refused(404, f"no command {command_id}")
    if command.status != Command.Status.SCHEDULED:
        raise Refused(
            409, f"command {command_id} is {command.status}; only scheduled ones can be cancelled"
        )
    command.status = Command.Status.CANCELLED
    command.finished_at = timezone.now()
    command.result = f"cancelled by {actor(user)}"
    command.save()
    audit.record(
        audit.Actor.USER,
        actor(user),
        ENDED[Command.Status.CANCELLED],
        command.election.name,
        command_detail(command),
        ip,
    )
    _ended(command)
    return command


@transaction.atomic
def set_paused(
    user: User,
    name: str,
    paused: bool,
    reason: str = "",
    ip: str | None = None,
    until: datetime | None = None,
) -> Election:
    """Pause (optionally until ``until``: a maintenance window that ends by itself) or resume."""
    require_operator(user)
    election = Election.objects.select_for_update().filter(name=name).first()
    if election is None:
        raise Refused(404, f"unknown election {name!r}")
    if paused and not reason.strip():
        raise Refused(400, "say why the election is paused")
    if paused and until is not None and until <= timezone.now():
        raise Refused(400, "the end of the maintenance window must be in the future")
    election.paused = paused
    election.paused_reason = reason.strip()[:500] if paused else ""
    election.paused_until = until if paused else None
    election.save(update_fields=["paused", "paused_reason", "paused_until", "updated"])
    action = audit.Action.PAUSED if paused else audit.Action.RESUMED
    detail: dict[str, object] = {"reason": reason}
    if paused and until is not None:
        detail["until"] = until.isoformat()
    audit.record(audit.Actor.USER, actor(user), action, name, detail, ip)
    elections_changed([election.pk])
    return election


def end_windows(now: datetime | None = None) -> list[str]:
    """Resume the elections whose maintenance window has ended (audited as the system)."""
    now = now or timezone.now()
    with transaction.atomic():
        # skip_locked: an operator resuming one by hand right now keeps it; the next run sees it.
        ended = list(
            Election.objects.select_for_update(skip_locked=True)
            .filter(paused=True, paused_until__lte=now)
            .order_by("pk")
        )
        if not ended:
            return []
        Election.objects.filter(pk__in=[e.pk for e in ended]).update(
            paused=False, paused_reason="", paused_until=None, updated=now
        )
        audit.record_many(
            audit.Pending(
                audit.Actor.SYSTEM,
                "system",
                audit.Action.RESUMED,
                e.name,
                {
                    "reason": "window ended",
                    "paused_for": e.paused_reason,
                    "until": e.paused_until.isoformat() if e.paused_until else None,
                },
            )
            for e in ended
        )
        elections_changed(e.pk for e in ended)
    return [e.name for e in ended]


# -- periodic ---------------------------------------------------------------------------


def run_due() -> list[int]:
    """Dispatch scheduled commands whose time has come (checks run again at send time)."""
    sent = []
    due = Command.objects.filter(status=Command.Status.SCHEDULED, scheduled_for__lte=timezone.now())
    for pk in due.values_list("pk", flat=True):
        with transaction.atomic():
            command = (
                Command.objects.select_for_update(of=("self",))
                .select_related("election__leader")
                .filter(pk=pk, status=Command.Status.SCHEDULED)
                .first()
            )
            if command is None:
                continue  # another worker took it
            election = command.election
            if election.paused:
                _finish(command, Command.Status.FAILED, "the election was paused")
                continue
            if not healthy_candidates(election) and not command.forced:
                _finish(
                    command, Command.Status.FAILED, "no healthy candidate at the scheduled time"
                )
                continue
            _dispatch(command, election)
            elections_changed([election.pk])
            sent.append(pk)
    return sent


def expire() -> list[int]:
    """Sent commands that got no answer in time end ``expired``."""
    expired = []
    now = timezone.now()
    for command in Command.objects.filter(status=Command.Status.SENT).select_related("election"):
        limit = command.hold_off + command.election.ttl + ANSWER_GRACE
        if command.sent_at and command.sent_at + timedelta(seconds=limit) < now:
            with transaction.atomic():
                # Compare-and-set: only if still sent (the answer may have just arrived).
                if Command.objects.filter(pk=command.pk, status=Command.Status.SENT).update(
                    status=Command.Status.EXPIRED
                ):
                    command.refresh_from_db()
                    _finish(command, Command.Status.EXPIRED, f"no answer within {limit:.0f}s")
                    expired.append(command.pk)
    return expired
