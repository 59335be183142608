"""HTML pages. Thin: read through leadermap / models, render."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render

from dashboard import control, leadermap
from elections.models import Election


@login_required
def leader_map(request: HttpRequest) -> HttpResponse:
    flt = leadermap.MapFilter.from_query(request.GET)
    items = list(leadermap.elections(flt))
    return render(
        request,
        "elections/map.html",
        {
            "rows": leadermap.render_rows(
                items, can_operate=request.user.has_perm("elections.force_stepdown")
            ),
            "empty": not items,
            "summary": leadermap.render_summary(),
            "filter": flt,
            "backends": Election.objects.order_by("backend")
            .values_list("backend", flat=True)
            .distinct(),
            "statuses": ["led", "leaderless", "split-brain", "unverified"],
        },
    )


@login_required
def election_detail(request: HttpRequest, name: str) -> HttpResponse:
    election = get_object_or_404(Election.objects.select_related("leader"), name=name)
    return render(
        request,
        "elections/detail.html",
        {
            "e": election,
            **leadermap.row_context(
                leadermap.elections(leadermap.MapFilter(), [election.pk]).get()
            ),
            "terms": election.terms.select_related("leader")[:50],
            "commands": control.recent_commands(election),
            "can_operate": request.user.has_perm("elections.force_stepdown"),
            "transitions": election.transitions.select_related("agent")[:100],
        },
    )
