"""The geometry of an election's timeline: terms, leaderless gaps and operators' commands
over a window of time, as percentages of its width. Pure: no database, no templates
(``templates/elections/_timeline.html`` draws it as SVG).

- A *term* segment per term, clipped to the window: who led, with which token, why it ended
  and, for a term an operator ended, who asked (the command's ``requested_by``).
- A *gap* segment wherever no term covers the window after the election first had a leader:
  the time between one term's end and the next one's start, or up to now when nobody leads.
- An *unknown* segment before the election's first term: nobody has led it yet, so there is
  no leader to miss.
- A *marker* for each step-down or switchover requested within the window, with its actor.

A gap of a few hundred milliseconds in a window of hours would be far less than a pixel, so
every segment is drawn at least ``MIN_WIDTH`` percent wide.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

#: Narrowest segment drawn, in percent of the width (about 2 px on a 1,200 px page).
MIN_WIDTH = 0.15
#: Tick spacings to choose from, the first giving at most ``MAX_TICKS`` ticks.
TICK_STEPS = tuple(
    timedelta(seconds=s)
    for s in (1, 5, 10, 15, 30, 60, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
)
MAX_TICKS = 8
#: Term segments at least this wide (percent) carry their leader's name.
LABEL_WIDTH = 7.0

TERM, GAP, UNKNOWN = "term", "gap", "unknown"


@dataclass(frozen=True)
class TermSpan:
    leader: str
    token: int
    started: datetime
    ended: datetime | None = None
    end_reason: str = ""


@dataclass(frozen=True)
class Action:
    """An operator's command: step-down or switchover."""

    at: datetime
    kind: str
    actor: str
    status: str
    #: The fencing token of the term it was sent to end.
    token: int | None = None
    successor: str = ""
    reason: str = ""


@dataclass(frozen=True)
class Segment:
    kind: str  # TERM, GAP or UNKNOWN
    start: datetime
    end: datetime
    x: float
    width: float
    leader: str = ""
    token: int | None = None
    end_reason: str = ""
    #: Who ended the term by a command (empty: nobody asked).
    actor: str = ""
    #: Runs on past the window's end (the current term, or the current gap).
    ongoing: bool = False

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()

    @property
    def length(self) -> str:
        return human(self.seconds)

    @property
    def label_x(self) -> float:
        return round(self.x + 0.3, 3)

    @property
    def labelled(self) -> bool:
        """Wide enough to carry its leader's name."""
        return self.kind == TERM and self.width >= LABEL_WIDTH


@dataclass(frozen=True)
class Marker:
    at: datetime
    x: float
    kind: str
    actor: str
    status: str
    successor: str = ""
    reason: str = ""

    @property
    def anchor(self) -> str:
        return anchor(self.x)


def anchor(x: float) -> str:
    """SVG text-anchor keeping a label at ``x`` percent inside the chart at either edge."""
    return "start" if x < 3 else "end" if x > 97 else "middle"


@dataclass(frozen=True)
class Tick:
    at: datetime
    x: float
    label: str

    @property
    def anchor(self) -> str:
        return anchor(self.x)


@dataclass
class Timeline:
    start: datetime
    end: datetime
    segments: list[Segment] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    ticks: list[Tick] = field(default_factory=list)
    #: The window starts at the election's first term, not the hours asked for.
    fitted: bool = False

    @property
    def gaps(self) -> list[Segment]:
        return [s for s in self.segments if s.kind == GAP]


def build(
    terms: Iterable[TermSpan],
    actions: Iterable[Action],
    start: datetime,
    end: datetime,
    *,
    led_before: bool = False,
) -> Timeline:
    """Lay out ``terms`` and ``actions`` over ``[start, end]``.

    ``led_before``: a term started before ``start`` (not necessarily among ``terms``), so
    uncovered time at the window's start is a gap rather than the time before any leader.
    """
    if end <= start:
        raise ValueError("the window must end after it starts")
    span = (end - start).total_seconds()

    def pct(at: datetime) -> float:
        return min(100.0, max(0.0, (at - start).total_seconds() / span * 100))

    def segment(kind: str, a: datetime, b: datetime, **extra: object) -> Segment:
        width = max(pct(b) - pct(a), MIN_WIDTH)
        x = min(pct(a), 100.0 - width)
        return Segment(kind, a, b, round(x, 3), round(width, 3), **extra)  # type: ignore[arg-type]

    items = list(actions)
    # The command that ended each term: the last one sent to its token that did not fail.
    enders: dict[int, Action] = {}
    for action in sorted(items, key=lambda a: a.at):
        if action.token is not None and action.status not in ("failed", "cancelled"):
            enders[action.token] = action

    timeline = Timeline(start, end)
    spans = sorted(
        (t for t in terms if t.started < end and (t.ended is None or t.ended > start)),
        key=lambda t: (t.started, t.token),
    )
    cursor, led = start, led_before or any(t.started < start for t in spans)
    for term in spans:
        a, b = max(term.started, start), min(term.ended or end, end)
        if a > cursor:
            timeline.segments.append(segment(GAP if led else UNKNOWN, cursor, a))
        ender = enders.get(term.token)
        timeline.segments.append(
            segment(
                TERM,
                a,
                b,
                leader=term.leader,
                token=term.token,
                end_reason=term.end_reason,
                actor=ender.actor if ender and term.ended else "",
                ongoing=term.ended is None or term.ended > end,
            )
        )
        cursor, led = max(cursor, b), True
    if cursor < end:
        timeline.segments.append(segment(GAP if led else UNKNOWN, cursor, end, ongoing=True))
    timeline.markers = [
        Marker(a.at, round(pct(a.at), 3), a.kind, a.actor, a.status, a.successor, a.reason)
        for a in sorted(items, key=lambda a: a.at)
        if start <= a.at <= end
    ]
    timeline.ticks = ticks(start, end)
    return timeline


def human(seconds: float) -> str:
    """A duration for a tooltip: 0.42 s, 12.3 s, 4m 05s, 2h 10m."""
    if seconds < 60:
        return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    return f"{minutes // 60}h {minutes % 60:02d}m"


def ticks(start: datetime, end: datetime) -> list[Tick]:
    """Round times across the window, at most ``MAX_TICKS`` of them."""
    span = end - start
    step = next((s for s in TICK_STEPS if span / s <= MAX_TICKS), TICK_STEPS[-1])
    seconds = int(step.total_seconds())
    epoch = int(start.timestamp())
    first = start + timedelta(seconds=(-epoch) % seconds, microseconds=-start.microsecond)
    if first < start:
        first += step
    found = []
    at = first
    fmt = "%H:%M" if seconds % 60 == 0 else "%H:%M:%S"
    while at <= end:
        found.append(Tick(at, round((at - start) / span * 100, 3), at.strftime(fmt)))
        at += step
    return found
