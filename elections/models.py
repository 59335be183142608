"""The domain: agents, elections, memberships, terms and the transition history.

State changes go through ``elections.actions``; nothing else writes these tables.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum

from django.db import models
from django.utils import timezone

import protocol

#: The one permission that lets a user steer elections (step-down, switchover, pause).
FORCE_STEPDOWN = "force_stepdown"


def _choices(name: str, values: type[StrEnum]) -> type[models.TextChoices]:
    """Model choices for a wire enum: the protocol defines the names, the models follow."""
    return models.TextChoices(name, [(member.name, member.value) for member in values])  # type: ignore[return-value]


class Agent(models.Model):
    id = models.CharField(primary_key=True, max_length=100)
    hostname = models.CharField(max_length=255, blank=True)
    version = models.CharField(max_length=50, blank=True)
    labels = models.JSONField(default=dict, blank=True)
    connected = models.BooleanField(default=False)
    connected_at = models.DateTimeField(null=True, blank=True)
    last_seen = models.DateTimeField(null=True, blank=True)
    #: Highest seq stored with no gap below it: what the dashboard acks.
    last_seq = models.BigIntegerField(default=0)
    #: Highest seq stored at all; above ``last_seq`` only while a gap waits to be filled.
    max_seq = models.BigIntegerField(default=0)
    #: The websocket session that speaks for this agent now (empty: none). A late write from
    #: an older session (a socket closing on one server while the agent already reconnected
    #: to another) must not mark the agent offline or online.
    session = models.CharField(max_length=32, blank=True)
    #: Seconds the agent's clock is ahead of the dashboard's (negative: behind), smoothed over
    #: its heartbeats (``elections.clock``); None until one arrived. Network delay counts in.
    clock_skew = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.id


class BearerToken(models.Model):
    """A bearer token, stored as a SHA-256 digest (``elections.tokens``; shown once at issue)."""

    digest = models.CharField(max_length=64, unique=True)
    created = models.DateTimeField(default=timezone.now)
    revoked = models.DateTimeField(null=True, blank=True)
    last_used = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True


class AgentToken(BearerToken):
    """What an agent presents on its websocket: it may speak for this one agent id."""

    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="tokens")


class Election(models.Model):
    class Status(models.TextChoices):
        LED = "led"
        LEADERLESS = "leaderless"
        SPLIT_BRAIN = "split-brain"

    name = models.CharField(max_length=200, unique=True)
    backend = models.CharField(max_length=20, blank=True)
    labels = models.JSONField(default=dict, blank=True)
    ttl = models.FloatField(default=10.0)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.LEADERLESS)
    leader = models.ForeignKey(
        Agent, null=True, blank=True, on_delete=models.SET_NULL, related_name="leading"
    )
    #: Fencing token of the current (or last) term: only ever grows.
    token = models.BigIntegerField(null=True, blank=True)
    leader_since = models.DateTimeField(null=True, blank=True)
    leaderless_since = models.DateTimeField(null=True, blank=True)
    #: A leader claim held as suspect (its token jumps far beyond what the other members
    #: report; see elections.terms): shown, audited, believed once another member sees it.
    suspect_leader = models.CharField(max_length=100, blank=True)
    suspect_token = models.BigIntegerField(null=True, blank=True)
    suspect_since = models.DateTimeField(null=True, blank=True)
    #: Maintenance: a paused election refuses commands; its agents keep electing normally.
    paused = models.BooleanField(default=False)
    paused_reason = models.CharField(max_length=500, blank=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        permissions = [(FORCE_STEPDOWN, "Can force a step-down or switchover")]

    def __str__(self) -> str:
        return self.name

    @property
    def dom_id(self) -> str:
        return f"election-{self.pk}"

    def leader_unverified(self) -> bool:
        """A leader is recorded but its agent is not connected: leadership cannot be confirmed."""
        return self.leader_id is not None and not (self.leader and self.leader.connected)


class Membership(models.Model):
    State = _choices("State", protocol.State)

    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="memberships")
    election = models.ForeignKey(Election, on_delete=models.CASCADE, related_name="memberships")
    state = models.CharField(max_length=20, choices=State.choices, default=State.FOLLOWER)
    #: Who this agent believes leads, and with which token (from its heartbeats).
    sees_leader = models.CharField(max_length=100, blank=True)
    sees_token = models.BigIntegerField(null=True, blank=True)
    lease_expires = models.DateTimeField(null=True, blank=True)
    #: The agent's last heartbeat claimed the seat with less than a third of the TTL left:
    #: renewals are being missed (``elections.leases``). Written only when it flips.
    lease_late = models.BooleanField(default=False)
    #: Agent time of the last transition applied (None: none yet).
    changed = models.DateTimeField(null=True, blank=True)
    priority = models.IntegerField(default=0)
    no_failover = models.BooleanField(default=False)

    class Meta:
        ordering = ["agent_id"]
        constraints = [
            models.UniqueConstraint(fields=["agent", "election"], name="one_membership_per_agent")
        ]

    def lease_left(self, now: datetime | None = None) -> timedelta | None:
        if self.lease_expires is None:
            return None
        return max(self.lease_expires - (now or timezone.now()), timedelta(0))


class Term(models.Model):
    EndReason = _choices("EndReason", protocol.EndReason)

    election = models.ForeignKey(Election, on_delete=models.CASCADE, related_name="terms")
    leader = models.ForeignKey(Agent, on_delete=models.PROTECT, related_name="terms")
    token = models.BigIntegerField()
    started = models.DateTimeField()
    ended = models.DateTimeField(null=True, blank=True)
    end_reason = models.CharField(max_length=20, choices=EndReason.choices, blank=True)

    class Meta:
        ordering = ["-token"]
        constraints = [
            models.UniqueConstraint(fields=["election", "token"], name="one_term_per_token")
        ]
        indexes = [models.Index(fields=["election", "-started"])]

    def duration(self) -> timedelta | None:
        return (self.ended or timezone.now()) - self.started


class Transition(models.Model):
    """One state change of one agent in one election: the campaign history."""

    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="transitions")
    election = models.ForeignKey(Election, on_delete=models.CASCADE, related_name="transitions")
    seq = models.BigIntegerField()
    from_state = models.CharField(max_length=20)
    to_state = models.CharField(max_length=20)
    token = models.BigIntegerField(null=True, blank=True)
    leader = models.CharField(max_length=100, blank=True)
    agent_time = models.DateTimeField()
    received = models.DateTimeField(default=timezone.now)
    detail = models.CharField(max_length=500, blank=True)
    reason = models.CharField(max_length=20, blank=True)

    class Meta:
        ordering = ["-agent_time", "-id"]
        constraints = [models.UniqueConstraint(fields=["agent", "seq"], name="transition_seq_once")]
        indexes = [models.Index(fields=["election", "-agent_time"])]


class Command(models.Model):
    """A step-down or switchover, from request to the agent's confirmed result."""

    Kind = _choices("Kind", protocol.CommandKind)

    class Status(models.TextChoices):
        SCHEDULED = "scheduled"
        PENDING = "pending"
        SENT = "sent"
        DONE = "done"
        FAILED = "failed"
        EXPIRED = "expired"
        CANCELLED = "cancelled"

    #: Statuses a command never leaves.
    FINAL = (Status.DONE, Status.FAILED, Status.EXPIRED, Status.CANCELLED)
    #: Statuses of a command on its way: at most one per election.
    IN_FLIGHT = (Status.PENDING, Status.SENT)

    election = models.ForeignKey(Election, on_delete=models.CASCADE, related_name="commands")
    kind = models.CharField(max_length=20, choices=Kind.choices)
    #: The leader the command was sent to.
    target = models.ForeignKey(
        Agent, null=True, blank=True, on_delete=models.SET_NULL, related_name="commands"
    )
    successor = models.CharField(max_length=100, blank=True)
    requested_by = models.ForeignKey(
        "auth.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    reason = models.CharField(max_length=500)
    forced = models.BooleanField(default=False)
    drill = models.BooleanField(default=False)
    hold_off = models.FloatField(default=5.0)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING)
    created = models.DateTimeField(default=timezone.now)
    scheduled_for = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    old_token = models.BigIntegerField(null=True, blank=True)
    new_token = models.BigIntegerField(null=True, blank=True)
    new_leader = models.CharField(max_length=100, blank=True)
    #: Drill: seconds between the old leader leaving and the new one taking the seat.
    leaderless_gap = models.FloatField(null=True, blank=True)
    result = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["-created"]
        indexes = [models.Index(fields=["status", "scheduled_for"])]

    @property
    def final(self) -> bool:
        return self.status in self.FINAL


class ApiToken(BearerToken):
    """A bearer token for automation (the JSON API), acting as its user."""

    user = models.ForeignKey("auth.User", on_delete=models.CASCADE, related_name="api_tokens")


class AuditEntry(models.Model):
    """Append-only. Each entry carries the hash of the previous one, so tampering shows."""

    class ActorType(models.TextChoices):
        USER = "user"
        AGENT = "agent"
        SYSTEM = "system"

    class Action(models.TextChoices):
        """Every action the dashboard records (the field takes any name: older entries keep
        theirs; these are what the filters suggest)."""

        LOGIN = "login"
        LOGIN_FAILED = "login-failed"
        LOGIN_THROTTLED = "login-throttled"
        LOGOUT = "logout"
        LEADER_CHANGED = "leader-changed"
        CLAIM_HELD = "claim-held"
        EVENTS_REFUSED = "events-refused"
        STEP_DOWN_REQUESTED = "step-down-requested"
        SWITCHOVER_REQUESTED = "switchover-requested"
        STEP_DOWN_REFUSED = "step-down-refused"
        COMMAND_DONE = "command-done"
        COMMAND_FAILED = "command-failed"
        COMMAND_EXPIRED = "command-expired"
        COMMAND_CANCELLED = "command-cancelled"
        PAUSED = "paused"
        RESUMED = "resumed"
        AGENT_TOKEN_ISSUED = "agent-token-issued"
        AGENT_TOKEN_REVOKED = "agent-token-revoked"
        API_TOKEN_ISSUED = "api-token-issued"
        API_TOKEN_REVOKED = "api-token-revoked"

    at = models.DateTimeField(default=timezone.now, db_index=True)
    actor_type = models.CharField(max_length=10, choices=ActorType.choices)
    actor = models.CharField(max_length=150)
    action = models.CharField(max_length=50, db_index=True)
    #: What it acted on: usually an election name.
    target = models.CharField(max_length=200, blank=True, db_index=True)
    detail = models.JSONField(default=dict, blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True)
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)

    class Meta:
        ordering = ["id"]
