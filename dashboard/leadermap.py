"""The leader map's data and HTML fragments, shared by the page and the live websocket."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlencode

from django.db.models import Count, Prefetch, Q, QuerySet
from django.http import QueryDict
from django.template.loader import render_to_string
from django.utils import timezone

from elections.models import Agent, Command, Election, Membership

ACTIVE = ("scheduled", "pending", "sent")


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
            elections = elections.filter(leader__isnull=False, leader__connected=False)
        elif self.status:
            elections = elections.filter(status=self.status)
        if self.q:
            elections = elections.filter(name__icontains=self.q)
        if self.label:
            key, _, value = self.label.partition("=")
            elections = elections.filter(labels__contains={key.strip(): value.strip()})
        return elections

    def querystring(self) -> str:
        return urlencode({k: v for k, v in self.__dict__.items() if v})


def elections(flt: MapFilter, ids: Iterable[int] | None = None) -> QuerySet[Election]:
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
    return flt.apply(qs)


def summary() -> dict[str, int]:
    counts = Election.objects.aggregate(
        total=Count("pk"),
        led=Count("pk", filter=Q(status="led")),
        leaderless=Count("pk", filter=Q(status="leaderless")),
        split=Count("pk", filter=Q(status="split-brain")),
        unverified=Count("pk", filter=Q(leader__isnull=False, leader__connected=False)),
    )
    counts["agents"] = Agent.objects.filter(connected=True).count()
    counts["agents_total"] = Agent.objects.count()
    return counts


def row_context(election: Election) -> dict[str, object]:
    members = list(election.memberships.all())
    leader_membership = next((m for m in members if m.agent_id == election.leader_id), None)
    return {
        "e": election,
        "members": members,
        "unverified": election.leader_unverified(),
        "lease_expires": leader_membership.lease_expires if leader_membership else None,
    }


def render_rows(items: Iterable[Election], *, oob: bool = False, can_operate: bool = False) -> str:
    return "".join(
        render_to_string(
            "elections/_row.html", {**row_context(e), "oob": oob, "can_operate": can_operate}
        )
        for e in items
    )


def render_commands(ids: Iterable[int]) -> str:
    """Fresh state of recent commands, for any open step-down dialog showing one."""
    since = timezone.now() - timedelta(minutes=10)
    recent = Command.objects.filter(election_id__in=list(ids), created__gte=since).select_related(
        "election"
    )
    return "".join(
        render_to_string("elections/_command.html", {"c": c, "oob": True}) for c in recent
    )


def render_summary(*, oob: bool = False) -> str:
    return render_to_string(
        "elections/_summary.html", {"s": summary(), "oob": oob, "now": timezone.now()}
    )


def render_snapshot(flt: MapFilter, can_operate: bool = False) -> tuple[str, set[int]]:
    """The whole table body and summary, as out-of-band swaps (sent on every (re)connect)."""
    items = list(elections(flt))
    body = render_to_string(
        "elections/_rows.html",
        {"rows": render_rows(items, can_operate=can_operate), "oob": True, "empty": not items},
    )
    return body + render_summary(oob=True), {e.pk for e in items}


def render_update(
    ids: set[int], flt: MapFilter, shown: set[int], can_operate: bool = False
) -> tuple[str, set[int]]:
    """Fragments for changed elections; a full snapshot when one appears that was not shown."""
    items = list(elections(flt, ids))
    matching = {e.pk for e in items}
    if matching - shown:
        html, shown = render_snapshot(flt, can_operate)
        return html + render_commands(ids), shown
    gone = (ids & shown) - matching
    html = render_rows(items, oob=True, can_operate=can_operate) + render_commands(ids)
    html += "".join(f'<tr id="election-{pk}" hx-swap-oob="delete"></tr>' for pk in sorted(gone))
    return html + render_summary(oob=True), shown - gone
