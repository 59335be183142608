"""The domain: agents, elections, memberships, terms and the transition history.

State changes go through ``elections.actions``; nothing else writes these tables.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from enum import StrEnum

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, URLValidator
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
    #: When an operator forgot this offline agent (hidden from the agents page; its next
    #: hello brings it back). The row stays: terms name their leaders.
    forgotten = models.DateTimeField(null=True, blank=True)
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
    #: The end of a maintenance window: the periodic sweep resumes the election then.
    paused_until = models.DateTimeField(null=True, blank=True)
    #: Set while more than ``ELECTORATE_FLAP_CHANGES`` terms started within the last
    #: ``ELECTORATE_FLAP_WINDOW`` seconds (``elections.flapping``); cleared by itself.
    flapping_since = models.DateTimeField(null=True, blank=True)
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
    #: When the agent last listed this election in a heartbeat (written with the lease, in
    #: the same statement): a connected agent that stops listing it leaves a zombie.
    reported = models.DateTimeField(null=True, blank=True)
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
    #: The failover gap: seconds from the previous leader's last proven lease (its own report
    #: of leaving, else its last known lease expiry) to this term's start; None for a first
    #: term or when nothing proves when the previous lease ended. See ``elections.gaps``.
    gap = models.FloatField(null=True, blank=True)

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
        MEMBERSHIP_FORGOTTEN = "membership-forgotten"
        ELECTION_FORGOTTEN = "election-forgotten"
        AGENT_FORGOTTEN = "agent-forgotten"
        AGENT_TOKEN_ISSUED = "agent-token-issued"
        AGENT_TOKEN_REVOKED = "agent-token-revoked"
        API_TOKEN_ISSUED = "api-token-issued"
        API_TOKEN_REVOKED = "api-token-revoked"
        FLAPPING = "flapping"
        FLAPPING_CLEARED = "flapping-cleared"

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


# -- alerts out: webhooks ------------------------------------------------------------------


def _webhook_secret() -> str:
    return secrets.token_urlsafe(32)


class Webhook(models.Model):
    """An endpoint that is told about chosen events (``elections.webhooks``), configured in
    the admin. ``kicked_at``, ``busy_until``, ``lease_owner`` and ``failures`` are the
    delivery's own bookkeeping, not settings."""

    class Kind(models.TextChoices):
        LEADER_CHANGE = "leader-change", "leader change"
        LEADERLESS = "leaderless", "leaderless longer than the threshold"
        SPLIT_BRAIN = "split-brain", "split-brain"
        FLAPPING = "flapping", "flapping"
        COMMAND = "command", "command outcome"
        #: Sent only by the admin's "Send a test event", whatever the webhook asked for.
        TEST = "test", "test"

    name = models.CharField(max_length=100, unique=True)
    url = models.URLField(
        max_length=500,
        validators=[URLValidator(schemes=["http", "https"])],
        help_text="http:// or https:// only; redirects are never followed.",
    )
    secret = models.CharField(
        max_length=200,
        default=_webhook_secret,
        help_text="Signs every request (HMAC-SHA256); the receiver needs it too.",
    )
    #: The kinds (``Kind`` values) this endpoint wants; none: it receives nothing.
    events = models.JSONField(default=list, blank=True)
    leaderless_after = models.FloatField(
        default=30.0,
        validators=[MinValueValidator(0.0)],
        help_text="Seconds leaderless before a leaderless event (once per spell).",
    )
    enabled = models.BooleanField(default=True)
    created = models.DateTimeField(default=timezone.now)
    #: A delivery task is queued and has not started yet (the next event need not queue one).
    kicked_at = models.DateTimeField(null=True, blank=True)
    #: Whoever drains this webhook's outbox holds it until then (also the backoff's end).
    busy_until = models.DateTimeField(null=True, blank=True)
    lease_owner = models.CharField(max_length=64, blank=True)
    #: Failed attempts in a row: the exponent of the backoff.
    failures = models.IntegerField(default=0)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        kinds = set(self.Kind.values)
        if not isinstance(self.events, list) or not set(self.events) <= kinds:
            raise ValidationError({"events": f"a list of: {', '.join(sorted(kinds))}"})


class WebhookDelivery(models.Model):
    """One POST to a webhook and how it went."""

    webhook = models.ForeignKey(Webhook, on_delete=models.CASCADE, related_name="deliveries")
    at = models.DateTimeField(default=timezone.now)
    ok = models.BooleanField(default=False)
    status_code = models.IntegerField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True)
    #: 1 for a first try, 2 for the first retry of the same pending events, and so on.
    attempt = models.IntegerField(default=1)
    events = models.IntegerField(default=0)
    duration = models.FloatField(default=0.0)

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [models.Index(fields=["webhook", "-at"])]
        verbose_name_plural = "webhook deliveries"


class WebhookEvent(models.Model):
    """The outbox: one event for one webhook, pending until a delivery carried it."""

    webhook = models.ForeignKey(Webhook, on_delete=models.CASCADE, related_name="outbox")
    kind = models.CharField(max_length=20, choices=Webhook.Kind.choices)
    election = models.CharField(max_length=200)
    at = models.DateTimeField(default=timezone.now)
    detail = models.JSONField(default=dict, blank=True)
    #: Leaderless events: the spell (the election's ``leaderless_since``), sent once each.
    spell = models.DateTimeField(null=True, blank=True)
    delivery = models.ForeignKey(
        WebhookDelivery, null=True, blank=True, on_delete=models.CASCADE, related_name="carried"
    )

    class Meta:
        ordering = ["id"]
        indexes = [
            models.Index(
                fields=["webhook", "id"],
                condition=models.Q(delivery__isnull=True),
                name="webhook_event_pending",
            )
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["webhook", "election", "spell"],
                condition=models.Q(spell__isnull=False),
                name="one_leaderless_event_per_spell",
            )
        ]


class MetricCounter(models.Model):
    """A counter summed over every server process (``elections.meters``): each process adds
    what it counted once a second, so a scrape of any process sees the fleet-wide total and
    a restart loses at most the last second."""

    name = models.CharField(primary_key=True, max_length=100)
    value = models.FloatField(default=0.0)
