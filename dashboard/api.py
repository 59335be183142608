"""JSON API under /api/v1/ (ARCHITECTURE §7, a contract)."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.shortcuts import get_object_or_404
from django.views.decorators.csrf import csrf_exempt

from dashboard import exports, leadermap
from elections import actions, tokens
from elections.models import Agent, Election, Term


class _CsrfCheck(CsrfViewMiddleware):
    def _reject(self, request: HttpRequest, reason: str) -> str:  # type: ignore[override]
        return reason  # the reason, not Django's HTML 403 page: the API answers in JSON


def _csrf_failure(request: HttpRequest) -> str | None:
    """Why a session-authenticated request fails the CSRF check, or None when it passes."""
    check = _CsrfCheck(lambda request: HttpResponse())
    check.process_request(request)
    return check.process_view(request, None, (), {})  # type: ignore[return-value]


def api_auth(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Session or ``Authorization: Bearer <API token>``; 401 JSON when neither holds.

    A bearer request acts as the token's user and needs no CSRF token (a browser never adds
    that header on its own); a session request keeps Django's CSRF check on unsafe methods.
    A bearer header wins over a session cookie, and a bad one is refused even with a session.
    """

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        header = request.headers.get("Authorization", "")
        if header.split(" ", 1)[0].lower() == "bearer":
            token = tokens.bearer({"Authorization": header})
            user = actions.authenticate_api_token(token) if token else None
            if user is None:
                return _unauthorized("invalid or revoked API token", 'error="invalid_token"')
            request.user = user
        elif not request.user.is_authenticated:
            return _unauthorized("authentication required")
        elif (reason := _csrf_failure(request)) is not None:
            return JsonResponse({"error": f"CSRF check failed: {reason}"}, status=403)
        return view(request, *args, **kwargs)

    return csrf_exempt(wrapper)


#: The name the views used before bearer tokens; same decorator.
api_login_required = api_auth


def _unauthorized(message: str, params: str = "") -> JsonResponse:
    response = JsonResponse({"error": message}, status=401)
    response["WWW-Authenticate"] = f'Bearer realm="electorate"{", " + params if params else ""}'
    return response


def _iso(value: Any) -> str | None:
    return value.isoformat() if value else None


def election_json(e: Election) -> dict[str, Any]:
    return {
        "name": e.name,
        "backend": e.backend,
        "labels": e.labels,
        "status": e.status,
        "leader": e.leader_id,
        "leader_connected": bool(e.leader and e.leader.connected),
        "token": e.token,
        "since": _iso(e.leader_since),
        "leaderless_since": _iso(e.leaderless_since) if e.leader_id is None else None,
        "held_claim": {
            "leader": e.suspect_leader,
            "token": e.suspect_token,
            "since": _iso(e.suspect_since),
        }
        if e.suspect_token is not None
        else None,
        "members": [
            {"agent": m.agent_id, "state": m.state, "connected": m.agent.connected}
            for m in e.memberships.all()
        ],
    }


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
        {"elections": [election_json(e) for e in page], "total": total, "next": following}
    )


@api_auth
def election(request: HttpRequest, name: str) -> JsonResponse:
    return JsonResponse(election_json(get_object_or_404(leadermap.elections(), name=name)))


@api_auth
def terms(request: HttpRequest, name: str) -> JsonResponse:
    e = get_object_or_404(Election, name=name)
    rows = Term.objects.filter(election=e).order_by("-token")[:500]
    return JsonResponse(
        {
            "election": e.name,
            "terms": [
                {
                    "leader": t.leader_id,
                    "token": t.token,
                    "started": _iso(t.started),
                    "ended": _iso(t.ended),
                    "end_reason": t.end_reason or None,
                }
                for t in rows
            ],
        }
    )


@api_auth
def agents(request: HttpRequest) -> JsonResponse:
    return JsonResponse(
        {
            "agents": [
                {
                    "id": a.id,
                    "connected": a.connected,
                    "hostname": a.hostname,
                    "version": a.version,
                    "last_seen": _iso(a.last_seen),
                    "last_seq": a.last_seq,
                }
                for a in Agent.objects.all()
            ]
        }
    )


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
        {"entries": [exports.audit_json(e) for e in entries], "next_before": next_before}
    )
