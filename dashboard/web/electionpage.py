"""One election's page (``/elections/<name>/``): its data and live fragments, shared by the
page and the live websocket.

The page is drawn from a fixed number of queries, whatever the election's history: the
election with its members and active commands (the map's query), the terms in the timeline's
window (at most ``TERM_LIMIT``) and whether any term came before it, the recent commands,
the latest terms and transitions. A live update re-renders the page's sections whole
(``fragments``), so a browser never holds a mix of older and newer sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.http import QueryDict
from django.template.loader import render_to_string
from django.utils import timezone

from dashboard.web import control, leadermap, timeline
from elections import gaps
from elections.models import Command, Election

#: Timeline windows offered, in hours; the first is the default.
WINDOWS = (6, 1, 24, 72)
#: Terms drawn at most: a flapping election's older terms beyond it are left out (said so).
TERM_LIMIT = 500
COMMAND_LIMIT = 200
#: A history shorter than the window is drawn from its first term, with this much of its
#: length before it (the time before any leader).
FIT_MARGIN = 0.05
#: The sections a live update replaces, in page order.
SECTIONS = (
    "elections/_election_head.html",
    "elections/_timeline.html",
    "elections/_gaps.html",
    "elections/_election_commands.html",
    "elections/_election_members.html",
    "elections/_election_terms.html",
    "elections/_election_transitions.html",
)


def window_hours(query: QueryDict) -> int:
    try:
        hours = int(query.get("hours", WINDOWS[0]))
    except ValueError:
        return WINDOWS[0]
    return hours if hours in WINDOWS else WINDOWS[0]


@dataclass(frozen=True)
class ElectionView:
    """What one browser shows: one election, and the timeline's window."""

    pk: int
    hours: int = WINDOWS[0]

    @classmethod
    def from_query(cls, query: QueryDict) -> ElectionView | None:
        try:
            pk = int(query.get("election", ""))
        except ValueError:
            return None
        return cls(pk, window_hours(query))


def load(pk: int) -> Election | None:
    return leadermap.elections([pk]).first()


def draw(election: Election, hours: int, now: datetime) -> timeline.Timeline:
    start = now - timedelta(hours=hours)
    terms = list(
        election.terms.filter(started__lt=now)
        .exclude(ended__lt=start)
        .order_by("-started")
        .values_list("leader_id", "token", "started", "ended", "end_reason")[:TERM_LIMIT]
    )
    led_before = election.terms.filter(started__lt=start).exists()
    fitted = False
    if len(terms) == TERM_LIMIT:  # older terms are not drawn: start where the drawn ones do
        start, led_before = max(start, terms[-1][2]), True
    elif terms and not led_before:
        # A history shorter than the window: draw it across the width, with a margin before.
        first = terms[-1][2]
        fitted_start = first - max((now - first) * FIT_MARGIN, timedelta(seconds=1))
        fitted = fitted_start > start
        start = max(start, fitted_start)
    commands = (
        election.commands.filter(created__gte=start, created__lte=now)
        .select_related("requested_by")
        .order_by("-created")[:COMMAND_LIMIT]
    )
    drawn = timeline.build(
        [timeline.TermSpan(*row) for row in terms],
        [action(c) for c in commands],
        start,
        now,
        led_before=led_before,
    )
    drawn.fitted = fitted
    return drawn


def action(c: Command) -> timeline.Action:
    return timeline.Action(
        at=c.sent_at or c.scheduled_for or c.created,
        kind=c.kind,
        actor=c.requested_by.get_username() if c.requested_by else "system",
        status=c.status,
        token=c.old_token,
        successor=c.successor,
        reason=c.reason,
    )


def context(election: Election, hours: int, now: datetime | None = None) -> dict[str, object]:
    """Everything the page's live sections show; ``election`` from ``load``."""
    now = now or timezone.now()
    row = leadermap.row_context(election)
    # Every member (the map's row shows a few), the leader first.
    members = sorted(
        election.memberships.all(), key=lambda m: (m.agent_id != election.leader_id, m.agent_id)
    )
    return {
        **row,
        "members": members,
        "terms": election.terms.select_related("leader")[:50],
        "commands": control.recent_commands(election),
        "transitions": election.transitions.select_related("agent")[:100],
        "timeline": draw(election, hours, now),
        "gaps": gaps.stats(election),
        "hours": hours,
        "windows": WINDOWS,
        "now": now,
    }


def fragments(view: ElectionView) -> list[str]:
    """The page's live sections as out-of-band swaps (none if the election is gone)."""
    election = load(view.pk)
    if election is None:
        return []
    ctx = {**context(election, view.hours), "oob": True}
    return [render_to_string(name, ctx) for name in SECTIONS]
