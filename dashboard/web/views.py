"""HTML pages. Thin: read through leadermap / models, render."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.template.loader import render_to_string

from dashboard.web import electionpage, leadermap
from elections.models import Election
from elections.permissions import can_operate


@login_required
def leader_map(request: HttpRequest) -> HttpResponse:
    view = leadermap.MapView.from_query(request.GET)
    p = leadermap.pieces(view, oob=False)
    body = render_to_string(
        "elections/_rows.html", {"rows": "".join(p.rows), "empty": not p.state.total}
    )
    return render(
        request,
        "elections/map.html",
        {
            "view": view,
            "summary": p.summary,
            "attention": "".join(p.attention),
            "groups": p.groups,
            "body": body,
            "pager": p.pager,
            "backends": Election.objects.order_by("backend")
            .values_list("backend", flat=True)
            .distinct(),
            "statuses": leadermap.STATUSES,
        },
    )


@login_required
def election_detail(request: HttpRequest, name: str) -> HttpResponse:
    election = leadermap.elections().filter(name=name).first()
    if election is None:
        raise Http404("no such election")
    hours = electionpage.window_hours(request.GET)
    return render(
        request,
        "elections/detail.html",
        {**electionpage.context(election, hours), "can_operate": can_operate(request.user)},
    )
