"""The agent <-> dashboard wire protocol: a contract that belongs to neither side.

Agents and the dashboard are deployed and upgraded separately, so each must keep accepting
what the other sends: change it only in ways old peers still read. The agent builds frames
with it and the dashboard validates them with it; the names both sides use for states, end
reasons and command kinds are defined here once (the dashboard's model choices derive from
them). Frames are JSON text objects with a ``type`` field. Nothing here imports Django.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

MAX_FRAME_BYTES = 64 * 1024
MAX_EVENTS_PER_FRAME = 500
MAX_ELECTIONS_PER_AGENT = 1000
MAX_LABELS = 20
#: Sequence numbers, fencing tokens and command ids are stored as signed 64-bit integers.
MAX_INT64 = 2**63 - 1
#: Consecutive invalid frames after which the dashboard closes the socket.
MAX_ERRORS = 10
#: Close code for repeated protocol abuse.
CLOSE_ABUSE = 4400
#: Close code when the hello names another agent than the token's, or its token was revoked.
CLOSE_WRONG_AGENT = 4403
#: Close code for an agent sending frames faster than the dashboard allows (it reconnects and
#: resends from its spool: nothing is lost).
CLOSE_RATE_LIMITED = 4429


class State(StrEnum):
    """An agent's part in one election."""

    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    LEADER = "leader"
    #: Watches and reports, never campaigns (configured so).
    OBSERVER = "observer"
    #: Would campaign, but is barred from leading (e.g. ``no_failover``, a hold-off).
    NO_VOTE = "no-vote"


class EndReason(StrEnum):
    """Why a term ended."""

    #: The leader gave the seat up (shutdown, a step-down it chose).
    RESIGNED = "resigned"
    #: An operator's step-down or switchover.
    FORCED = "forced"
    #: The lease ran out before it was renewed.
    EXPIRED = "expired"
    #: The backend took the seat away (a revoked lease, a lost session).
    LOST = "lost"
    #: The dashboard stopped hearing from the leader's agent.
    AGENT_OFFLINE = "agent-offline"
    #: A newer fencing token was seen: someone else leads now.
    SUPERSEDED = "superseded"


class CommandKind(StrEnum):
    STEP_DOWN = "step-down"
    SWITCHOVER = "switchover"


Name = Annotated[
    str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
]
AgentId = Annotated[
    str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]
Short = Annotated[str, Field(max_length=500)]
Int64 = Annotated[int, Field(ge=0, le=MAX_INT64)]
Positive64 = Annotated[int, Field(ge=1, le=MAX_INT64)]
#: A span of time in seconds, at most a day (a TTL, what is left of one, a handover's gap).
Seconds = Annotated[float, Field(ge=0, le=86400, allow_inf_nan=False)]
#: Times must say their zone: a naive time would be read in the dashboard's.
Time = AwareDatetime
Labels = Annotated[
    dict[Annotated[str, Field(max_length=50)], Annotated[str, Field(max_length=100)]],
    Field(max_length=MAX_LABELS),
]


class Frame(BaseModel):
    # Enum fields keep their plain string values: they go to JSON and SQL as they are.
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=True)


class ElectionInfo(Frame):
    name: Name
    backend: Annotated[str, Field(min_length=1, max_length=20)]
    labels: Labels = {}
    ttl: Annotated[Seconds, Field(gt=0)]


class Hello(Frame):
    type: Literal["hello"] = "hello"
    agent: AgentId
    hostname: Annotated[str, Field(max_length=255)] = ""
    version: Annotated[str, Field(max_length=50)] = ""
    elections: Annotated[list[ElectionInfo], Field(max_length=MAX_ELECTIONS_PER_AGENT)] = []
    last_seq: Int64 = 0


class Change(Frame):
    """One state transition of one agent in one election, as the agent's runner reports it.
    The wire's ``Event`` is a change with the sequence number the spool gave it."""

    election: Name
    from_: State = Field(alias="from")
    to: State
    token: Int64 | None = None
    leader: AgentId | None = None
    at: Time
    detail: Short = ""
    #: Set when a leader leaves the seat: why its term ended.
    reason: EndReason | None = None

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, use_enum_values=True
    )

    def spooled(self) -> dict[str, Any]:
        """The change as the spool keeps it until the dashboard acks it (JSON, wire names)."""
        return self.model_dump(mode="json", by_alias=True)


class Event(Change):
    """A change on the wire: the agent's sequence number makes resends idempotent."""

    seq: Positive64


class Events(Frame):
    type: Literal["events"] = "events"
    items: Annotated[list[Event], Field(min_length=1, max_length=MAX_EVENTS_PER_FRAME)]


class ElectionState(Frame):
    state: State
    leader: AgentId | None = None
    token: Int64 | None = None
    ttl_left: Seconds | None = None


class Heartbeat(Frame):
    type: Literal["heartbeat"] = "heartbeat"
    at: Time
    states: Annotated[dict[Name, ElectionState], Field(max_length=MAX_ELECTIONS_PER_AGENT)] = {}


class Result(Frame):
    type: Literal["result"] = "result"
    command: Positive64
    ok: bool
    detail: Short = ""
    #: The fencing token the agent saw after acting (a new leader's), when it knows one.
    token: Int64 | None = None
    #: Who holds the seat now, as the agent saw it.
    leader: AgentId | None = None
    #: Seconds from this agent giving up the seat to seeing the new leader (drills).
    gap: Seconds | None = None


class Ack(Frame):
    type: Literal["ack"] = "ack"
    seq: Int64


class Error(Frame):
    type: Literal["error"] = "error"
    code: str
    message: str


class Command(Frame):
    type: Literal["command"] = "command"
    id: Positive64
    kind: CommandKind
    election: Name
    successor: AgentId | None = None
    hold_off: Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)] = 5.0


AgentFrame = Annotated[Hello | Events | Heartbeat | Result, Field(discriminator="type")]
DashboardFrame = Annotated[Ack | Error | Command, Field(discriminator="type")]
_agent_frames: TypeAdapter[AgentFrame] = TypeAdapter(AgentFrame)
_dashboard_frames: TypeAdapter[DashboardFrame] = TypeAdapter(DashboardFrame)


class ProtocolError(ValueError):
    """A frame that cannot be accepted; ``code`` is sent back in the ``error`` frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _load(text: str | bytes) -> Any:
    if len(text) > MAX_FRAME_BYTES:
        raise ProtocolError(
            "too-large", f"frame is {len(text)} bytes; the limit is {MAX_FRAME_BYTES}"
        )
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("bad-json", f"frame is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad-frame", "frame must be a JSON object")
    return data


def _explain(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "frame"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def parse_agent_frame(text: str | bytes) -> Hello | Events | Heartbeat | Result:
    """Validate a frame sent by an agent, or raise ProtocolError naming the problem."""
    data = _load(text)
    kind = data.get("type")
    if kind not in ("hello", "events", "heartbeat", "result"):
        raise ProtocolError("unknown-type", f"unknown frame type {kind!r}")
    try:
        return _agent_frames.validate_python(data)
    except ValidationError as exc:
        raise ProtocolError("invalid", f"invalid {kind} frame: {_explain(exc)}") from None


def parse_dashboard_frame(text: str | bytes) -> Ack | Error | Command:
    """Validate a frame sent by the dashboard."""
    data = _load(text)
    try:
        return _dashboard_frames.validate_python(data)
    except ValidationError as exc:
        raise ProtocolError("invalid", _explain(exc)) from None


def spooled_event(data: dict[str, Any]) -> Event:
    """An event read back from the spool, made valid if it somehow is not.

    Its seq must reach the dashboard whatever it holds (the dashboard acks the highest seq
    with no gap below it), so an event that fails validation (e.g. a leader name a backend
    reported that is no agent id) is sent with the offending fields dropped, or at worst as
    a placeholder that says why, rather than blocking every later event forever.
    """
    try:
        return Event.model_validate(data)
    except ValidationError as exc:
        problem = _explain(exc)
    lenient = {**data, "leader": None, "reason": None, "detail": str(data.get("detail", ""))[:500]}
    try:
        return Event.model_validate(lenient)
    except ValidationError:
        return Event.model_validate(
            {
                "seq": data.get("seq"),
                "election": "unreadable-event",
                "from": "follower",
                "to": "follower",
                "at": datetime.now(UTC),
                "detail": f"the spooled event could not be read: {problem}"[:500],
            }
        )


def dump(frame: Frame) -> str:
    return frame.model_dump_json(by_alias=True, exclude_none=True)
