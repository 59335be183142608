"""The leader map's data and HTML fragments, shared by the page and the live websocket.

A map of 5,000 elections must stay readable at a glance and cheap to keep live, so it is
never drawn whole:

- *needs attention*: the problem elections (split-brain, leaderless, unverified, a held
  leader claim) first, by severity, at most ``ATTENTION_LIMIT`` of them with the count of the rest;
- *groups*: elections by cluster label and backend, with counts by status, each a filter;
- *elections*: one page of ``PAGE_SIZE`` rows in name order, so a status change swaps a row
  in place and never moves the others.

A ``MapView`` (filter and page) is what one browser shows; ``ViewState`` remembers which rows
it showed, so an update (``update``) re-renders only changed rows that are on screen, the
attention list when it changed, and the page only when its rows changed.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import quote, urlencode

from django.db.models import (
    Case,
    Count,
    Exists,
    IntegerField,
    OuterRef,
    Prefetch,
    Q,
    QuerySet,
    Value,
    When,
)
from django.db.models.fields.json import KeyTextTransform
from django.http import QueryDict
from django.template.loader import render_to_string
from django.urls import get_script_prefix, reverse
from django.utils import timezone
from django.utils.http import RFC3986_SUBDELIMS

from elections import clock, leases
from elections.models import Agent, Command, Election, Membership

ACTIVE = (Command.Status.SCHEDULED, *Command.IN_FLIGHT)
PAGE_SIZE = 100
ATTENTION_LIMIT = 50
GROUP_LIMIT = 30
#: Member chips and labels drawn per row; the rest are counted ("+12").
MEMBERS_SHOWN = 8
LABELS_SHOWN = 4
#: The map's status filter: the stored statuses, "unverified" (a leader not connected) and
#: "flapping" (elections.flapping; a flag beside the status, not a status) and "lease-late"
#: (a connected leader missing its renewals).
STATUSES = (*Election.Status.values, "unverified", "lease-late", "flapping")

SPLIT, LEADERLESS = Election.Status.SPLIT_BRAIN, Election.Status.LEADERLESS
UNVERIFIED = Q(leader__isnull=False, leader__connected=False)
#: The leader's last heartbeat reported less than a third of its TTL left (elections.leases);
#: only for a led election whose leader is connected, so each state means one thing.
LEASE_LATE = (
    Q(
        Exists(
            Membership.objects.filter(
                election_id=OuterRef("pk"),
                agent_id=OuterRef("leader_id"),
                state=Membership.State.LEADER,
                lease_late=True,
            )
        )
    )
    & Q(status=Election.Status.LED)
    & ~UNVERIFIED
)
#: A leader claim held as suspect (elections.terms) needs a look too.
HELD = Q(suspect_token__isnull=False)
#: A seat changing hands too often (elections.flapping) too.
FLAPPING = Q(flapping_since__isnull=False)
PROBLEM = Q(status__in=[SPLIT, LEADERLESS]) | UNVERIFIED | LEASE_LATE | HELD | FLAPPING


@dataclass(frozen=True)
class MapFilter:
    backend: str = ""
    status: str = ""
    label: str = ""  # "key=value"
    q: str = ""

    @classmethod
    def from_query(cls, query: QueryDict) -> MapFilter:
        return cls(
            backend=query.get("backend", "").strip(),
            status=query.get("status", "").strip(),
            label=query.get("label", "").strip(),
            q=query.get("q", "").strip(),
        )

    def apply(self, elections: QuerySet[Election]) -> QuerySet[Election]:
        if self.backend:
            elections = elections.filter(backend=self.backend)
        if self.status == "unverified":
            elections = elections.filter(UNVERIFIED)
        elif self.status == "flapping":
            elections = elections.filter(FLAPPING)
        elif self.status == "lease-late":
            elections = elections.filter(LEASE_LATE)
        elif self.status:
            elections = elections.filter(status=self.status)
        if self.q:
            elections = elections.filter(name__icontains=self.q)
        if self.label:
            key, _, value = self.label.partition("=")
            # A key transform, not ``labels__contains``: SQLite (the demo) has no contains.
            elections = elections.alias(_label=KeyTextTransform(key.strip(), "labels")).filter(
                _label=value.strip()
            )
        return elections

    def params(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v}

    def querystring(self) -> str:
        return urlencode(self.params())


@dataclass(frozen=True)
class MapView:
    """What one browser shows: a filter and a page of it."""

    filter: MapFilter = MapFilter()
    page: int = 1

    @classmethod
    def from_query(cls, query: QueryDict) -> MapView:
        try:
            page = max(1, min(int(query.get("page", "1")), 10_000))
        except ValueError:
            page = 1
        return cls(MapFilter.from_query(query), page)

    def querystring(self, page: int | None = None) -> str:
        page = self.page if page is None else page
        return urlencode({**self.filter.params(), **({"page": page} if page > 1 else {})})


@dataclass(frozen=True)
class ViewState:
    """Which rows a view showed, to tell what an update must redraw."""

    attention: tuple[int, ...] = ()
    attention_total: int = 0
    page: tuple[int, ...] = ()
    total: int = 0


# -- queries ----------------------------------------------------------------------------------


def elections(ids: Iterable[int] | None = None, flt: MapFilter | None = None) -> QuerySet[Election]:
    """Elections with what a row shows: leader, members and their agents, active commands."""
    qs = Election.objects.select_related("leader").prefetch_related(
        Prefetch("memberships", queryset=Membership.objects.select_related("agent")),
        Prefetch(
            "commands",
            queryset=Command.objects.filter(status__in=ACTIVE),
            to_attr="active_commands",
        ),
    )
    if ids is not None:
        qs = qs.filter(pk__in=list(ids))
    return (flt or MapFilter()).apply(qs)


def severity() -> Case:
    return Case(
        When(status=SPLIT, then=Value(0)),
        When(status=LEADERLESS, then=Value(1)),
        When(UNVERIFIED, then=Value(2)),
        When(LEASE_LATE, then=Value(3)),
        default=Value(4),
        output_field=IntegerField(),
    )


def attention_ids(flt: MapFilter) -> tuple[tuple[int, ...], int]:
    """The problem elections to show first (by severity, then name) and how many there are."""
    problems = flt.apply(Election.objects.filter(PROBLEM))
    ids = tuple(
        problems.annotate(severity=severity())
        .order_by("severity", "name")
        .values_list("pk", flat=True)[:ATTENTION_LIMIT]
    )
    total = len(ids) if len(ids) < ATTENTION_LIMIT else problems.count()
    return ids, total


def page_ids(view: MapView) -> tuple[tuple[int, ...], int]:
    matching = view.filter.apply(Election.objects.all())
    start = (view.page - 1) * PAGE_SIZE
    ids = tuple(matching.order_by("name").values_list("pk", flat=True)[start : start + PAGE_SIZE])
    total = matching.count()
    return ids, total


def summary() -> dict[str, int]:
    counts = Election.objects.aggregate(
        total=Count("pk"),
        led=Count("pk", filter=Q(status=Election.Status.LED)),
        leaderless=Count("pk", filter=Q(status=LEADERLESS)),
        split=Count("pk", filter=Q(status=SPLIT)),
        unverified=Count("pk", filter=UNVERIFIED),
        flapping=Count("pk", filter=FLAPPING),
        lease_late=Count("pk", filter=LEASE_LATE),
    )
    agents = Agent.objects.aggregate(
        total=Count("pk"), connected=Count("pk", filter=Q(connected=True))
    )
    counts["agents"], counts["agents_total"] = agents["connected"], agents["total"]
    return counts


def groups(flt: MapFilter) -> tuple[list[dict[str, object]], int]:
    """Elections by cluster label and backend, problem groups first; and how many more."""
    rows = list(
        flt.apply(Election.objects.all())
        .annotate(cluster=KeyTextTransform("cluster", "labels"))
        .values("cluster", "backend")
        .annotate(
            total=Count("pk"),
            led=Count("pk", filter=Q(status=Election.Status.LED) & ~UNVERIFIED & ~LEASE_LATE),
            leaderless=Count("pk", filter=Q(status=LEADERLESS)),
            split=Count("pk", filter=Q(status=SPLIT)),
            unverified=Count("pk", filter=UNVERIFIED & Q(status=Election.Status.LED)),
            lease_late=Count("pk", filter=LEASE_LATE),
        )
    )
    rows.sort(
        key=lambda r: (
            -(r["split"] + r["leaderless"] + r["unverified"] + r["lease_late"]),
            -r["total"],
        )
    )
    for row in rows:
        params = {**flt.params(), "backend": row["backend"]}
        if row["cluster"]:
            params["label"] = f"cluster={row['cluster']}"
        row["query"] = urlencode(params)
    return rows[:GROUP_LIMIT], max(0, len(rows) - GROUP_LIMIT)


# -- fragments ----------------------------------------------------------------------------


@functools.cache
def _url_parts(view: str, script_prefix: str) -> tuple[str, str]:
    """The parts of a per-election URL around its name (reversed once, not once a row)."""
    marker = "ELECTION-NAME-MARKER"
    before, _, after = reverse(view, args=[marker]).partition(marker)
    return before, after


def election_url(view: str, name: str) -> str:
    """``reverse(view, args=[name])`` for the election views, without the resolver's cost
    (a page of the map links every row twice); quoted exactly as ``reverse`` quotes."""
    before, after = _url_parts(view, get_script_prefix())
    return before + quote(name, safe=RFC3986_SUBDELIMS + "/~:@") + after


def lease_health(election: Election, leader: Membership | None) -> dict[str, object]:
    """The leader's lease as a row shows it: expiry, last renewal, and whether it is late."""
    unverified = election.leader_unverified()
    claims = leader is not None and leader.state == Membership.State.LEADER
    return {
        "unverified": unverified,
        "lease_expires": leader.lease_expires if leader else None,
        "lease_renewed": leases.renewed_at(leader.lease_expires, election.ttl) if claims else None,
        "lease_late": claims
        and leader.lease_late
        and election.status == Election.Status.LED
        and not unverified,
    }


def row_context(election: Election) -> dict[str, object]:
    members = list(election.memberships.all())
    leader_membership = next((m for m in members if m.agent_id == election.leader_id), None)
    for m in members:
        m.skewed = clock.skewed(m.agent.clock_skew)
    # The leader first, then members whose agent is away, then the rest: what matters at 3 a.m.
    members.sort(key=lambda m: (m.agent_id != election.leader_id, m.agent.connected, m.agent_id))
    labels = list(election.labels.items()) if isinstance(election.labels, dict) else []
    return {
        "e": election,
        "url": election_url("election", election.name),
        "stepdown_url": election_url("stepdown", election.name),
        "labels": labels[:LABELS_SHOWN],
        "more_labels": max(0, len(labels) - LABELS_SHOWN),
        "members": members[:MEMBERS_SHOWN],
        "more_members": max(0, len(members) - MEMBERS_SHOWN),
        "leader_skewed": leader_membership is not None and leader_membership.skewed,
        "leader_skew": leader_membership.agent.clock_skew if leader_membership else None,
        **lease_health(election, leader_membership),
    }


def render_row(election: Election, *, prefix: str = "election", oob: bool = False) -> str:
    return render_to_string(
        "elections/_row.html", {**row_context(election), "prefix": prefix, "oob": oob}
    )


def render_attention(items: list[Election], total: int, view: MapView, *, oob: bool) -> list[str]:
    """The attention section; for a frame (``oob``) its rows follow as separate table parts."""
    rows = [render_row(e, prefix="attention") for e in items]
    section = render_to_string(
        "elections/_attention.html",
        {
            "rows": "" if oob else "".join(rows),
            "count": len(items),
            "total": total,
            "more": total - len(items),
            "view": view,
            "oob": oob,
        },
    )
    return [section, *table_parts("attention-rows", rows)] if oob and rows else [section]


def render_groups(flt: MapFilter, *, oob: bool) -> str:
    rows, more = groups(flt)
    return render_to_string("elections/_groups.html", {"groups": rows, "more": more, "oob": oob})


def render_pager(view: MapView, total: int, shown: int, *, oob: bool) -> str:
    first = (view.page - 1) * PAGE_SIZE + 1
    pages = max(1, -(-total // PAGE_SIZE))
    return render_to_string(
        "elections/_pager.html",
        {
            "first": first if shown else 0,
            "last": first + shown - 1,
            "total": total,
            "page": view.page,
            "pages": pages,
            "prev": view.querystring(view.page - 1) if view.page > 1 else None,
            "next": view.querystring(view.page + 1) if view.page < pages else None,
            "oob": oob,
        },
    )


def render_summary(*, oob: bool = False) -> str:
    return render_to_string(
        "elections/_summary.html", {"s": summary(), "oob": oob, "now": timezone.now()}
    )


def render_commands(ids: Collection[int]) -> str:
    """Fresh state of recent commands, for any open step-down dialog showing one."""
    since = timezone.now() - timedelta(minutes=10)
    recent = Command.objects.filter(election_id__in=list(ids), created__gte=since).select_related(
        "election"
    )
    return "".join(
        render_to_string("elections/_command.html", {"c": c, "oob": True}) for c in recent
    )


def table_parts(body_id: str, rows: list[str], *, empty: str = "") -> list[str]:
    """A table body as fragments: the first replaces it, later ones append a row each.

    Split so that no websocket frame has to carry a whole table (see ``live.pack``).
    """
    first = f'<tbody id="{body_id}" hx-swap-oob="true">{rows[0] if rows else empty}</tbody>'
    return [first] + [
        f'<tbody hx-swap-oob="beforeend:#{body_id}">{row}</tbody>' for row in rows[1:]
    ]


EMPTY_ROWS = (
    '<tr class="empty"><td colspan="9">No elections here. Agents register theirs when they '
    "connect.</td></tr>"
)


def body_parts(rows: list[str], *, empty: bool) -> list[str]:
    return table_parts("election-rows", rows, empty=EMPTY_ROWS if empty else "")


# -- snapshots and updates ---------------------------------------------------------------


@dataclass
class Rendered:
    """Fragments for one view, and what it now shows."""

    parts: list[str] = field(default_factory=list)
    state: ViewState = ViewState()


@dataclass
class Pieces:
    """The parts of one view, rendered for the page (``oob=False``) or a snapshot frame."""

    summary: str
    attention: list[str]
    groups: str
    rows: list[str]
    pager: str
    state: ViewState


def pieces(view: MapView, *, oob: bool) -> Pieces:
    attention, attention_total = attention_ids(view.filter)
    ids, total = page_ids(view)
    rows = load(set(attention) | set(ids))
    return Pieces(
        summary=render_summary(oob=oob),
        attention=render_attention([rows[pk] for pk in attention], attention_total, view, oob=oob),
        groups=render_groups(view.filter, oob=oob),
        rows=[render_row(rows[pk]) for pk in ids],
        pager=render_pager(view, total, len(ids), oob=oob),
        state=ViewState(attention, attention_total, ids, total),
    )


def snapshot(view: MapView) -> Rendered:
    """Everything one view shows, as out-of-band swaps (sent on every (re)connect)."""
    p = pieces(view, oob=True)
    parts = [
        p.summary,
        *p.attention,
        p.groups,
        *body_parts(p.rows, empty=not p.state.total),
        p.pager,
    ]
    return Rendered(parts, p.state)


Target = tuple[MapView, ViewState]


def update(changed: set[int], targets: Collection[Target]) -> dict[Target, Rendered]:
    """What to send to browsers showing ``view`` as of ``state``, after ``changed`` changed.

    Each changed row is rendered once, whatever the number of views showing it; queries run
    once per distinct filter and view, never per election.
    """
    by_filter: dict[MapFilter, list[Target]] = {}
    for target in targets:
        by_filter.setdefault(target[0].filter, []).append(target)
    plans: dict[Target, tuple[ViewState, bool, bool]] = {}
    needed: set[int] = set()
    pages: dict[MapView, tuple[tuple[int, ...], int]] = {}
    for flt, group in by_filter.items():
        attention, attention_total = attention_ids(flt)
        matching = set(
            flt.apply(Election.objects.filter(pk__in=list(changed))).values_list("pk", flat=True)
        )
        for view, old in group:
            shown = set(old.page)
            if matching - shown or (changed & shown) - matching:
                if view not in pages:
                    pages[view] = page_ids(view)
                ids, total = pages[view]
            else:
                ids, total = old.page, old.total
            redraw_page = (ids, total) != (old.page, old.total)
            redraw_attention = (attention, attention_total) != (
                old.attention,
                old.attention_total,
            ) or bool(changed & set(attention))
            plans[(view, old)] = (
                ViewState(attention, attention_total, ids, total),
                redraw_attention,
                redraw_page,
            )
            if redraw_attention:
                needed |= set(attention)
            needed |= set(ids) if redraw_page else changed & set(ids)
    rows = load(needed)
    shared = [render_summary(oob=True)] if changed else []
    groups_part = {flt: render_groups(flt, oob=True) for flt in by_filter} if changed else {}
    commands_part = render_commands(changed) if changed else ""
    row_html: dict[int, str] = {}
    attention_html: dict[tuple[MapView, ViewState], list[str]] = {}
    results: dict[Target, Rendered] = {}
    for (view, old), (state, redraw_attention, redraw_page) in plans.items():
        parts = list(shared)
        if redraw_attention:
            key = (view, state)
            if key not in attention_html:
                attention_html[key] = render_attention(
                    [rows[pk] for pk in state.attention], state.attention_total, view, oob=True
                )
            parts += attention_html[key]
        if view.filter in groups_part:
            parts.append(groups_part[view.filter])
        if redraw_page:
            parts += body_parts([render_row(rows[pk]) for pk in state.page], empty=not state.total)
            parts.append(render_pager(view, state.total, len(state.page), oob=True))
        else:
            for pk in sorted(changed & set(state.page)):
                if pk not in row_html:
                    row_html[pk] = render_row(rows[pk], oob=True)
                parts.append(row_html[pk])
        if commands_part:
            parts.append(commands_part)
        results[(view, old)] = Rendered(parts, state)
    return results


def load(ids: Collection[int]) -> dict[int, Election]:
    return {e.pk: e for e in elections(ids)} if ids else {}
