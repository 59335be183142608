"""The read side of the JSON API under /api/v1/: elections, terms, agents, the audit log.

A contract for scripts: fields are only ever added (shapes in ``elections.serializers``)."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404

from dashboard import exports
from dashboard.auth import api_auth
from dashboard.web import leadermap
from elections import gaps, serializers
from elections.models import Agent, Election, Term

#: Elections per page of ``GET /api/v1/elections`` unless ``limit`` says otherwise.
ELECTIONS_PAGE = 500


@api_auth
def elections(request: HttpRequest) -> JsonResponse:
    """A page of elections in name order, with the total; ``next`` links the next page.

    ``after`` is a cursor (the last name of the previous page): pages stay consistent while
    elections come and go, and page 10 costs what page 1 does. The map's filters apply too.
    """
    flt = leadermap.MapFilter.from_query(request.GET)
    try:
        limit = exports.parse_int(
            request.GET.get("limit"),
            "limit",
            low=1,
            high=exports.API_MAX_LIMIT,
            default=ELECTIONS_PAGE,
        )
    except exports.BadFilter as bad:
        return JsonResponse({"error": str(bad)}, status=400)
    after = request.GET.get("after", "")
    total = flt.apply(Election.objects.all()).count()
    rows = leadermap.elections(flt=flt).order_by("name")
    if after:
        rows = rows.filter(name__gt=after)
    page = list(rows[: limit + 1])
    more, page = len(page) > limit, page[:limit]
    following = None
    if more:
        query = request.GET.copy()
        query["after"] = page[-1].name
        following = f"{request.path}?{query.urlencode()}"
    return JsonResponse(
        {
            "elections": [serializers.election_json(e) for e in page],
            "total": total,
            "next": following,
        }
    )


@api_auth
def election(request: HttpRequest, name: str) -> JsonResponse:
    """One election, with its failover gaps over ``ELECTORATE_GAP_WINDOW``."""
    e = get_object_or_404(leadermap.elections(), name=name)
    return JsonResponse({**serializers.election_json(e), "failover_gaps": gaps.stats(e).as_json()})


@api_auth
def terms(request: HttpRequest, name: str) -> JsonResponse:
    e = get_object_or_404(Election, name=name)
    rows = Term.objects.filter(election=e).order_by("-token")[:500]
    return JsonResponse(
        {
            "election": e.name,
            "terms": [serializers.term_json(t) for t in rows],
        }
    )


@api_auth
def agents(request: HttpRequest) -> JsonResponse:
    agents = Agent.objects.filter(forgotten__isnull=True)  # forgotten: gone until a hello
    return JsonResponse({"agents": [serializers.agent_json(a) for a in agents]})


@api_auth
def audit(request: HttpRequest) -> JsonResponse:
    """Newest first; ``before`` (an entry id) pages back, ``next_before`` is the next page."""
    try:
        flt = exports.Filter.from_query(request.GET)
        limit = exports.parse_int(
            request.GET.get("limit"), "limit", low=1, high=exports.API_MAX_LIMIT, default=100
        )
        before = exports.parse_int(
            request.GET.get("before"), "before", low=1, high=2**63 - 1, default=None
        )
    except exports.BadFilter as bad:
        return JsonResponse({"error": str(bad)}, status=400)
    entries, next_before = exports.audit_page(flt, before, limit)
    return JsonResponse(
        {"entries": [serializers.audit_json(e) for e in entries], "next_before": next_before}
    )
