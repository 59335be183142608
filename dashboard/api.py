"""JSON API under /api/v1/ (ARCHITECTURE §7, a contract)."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404

from elections.models import Agent, Election, Membership, Term


def api_login_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated:
            return JsonResponse({"error": "authentication required"}, status=401)
        return view(request, *args, **kwargs)

    return wrapper


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
        "members": [
            {"agent": m.agent_id, "state": m.state, "connected": m.agent.connected}
            for m in e.memberships.all()
        ],
    }


def _elections() -> Any:
    return Election.objects.select_related("leader").prefetch_related(_members_prefetch())


def _members_prefetch() -> Any:
    from django.db.models import Prefetch

    return Prefetch("memberships", queryset=Membership.objects.select_related("agent"))


@api_login_required
def elections(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"elections": [election_json(e) for e in _elections()]})


@api_login_required
def election(request: HttpRequest, name: str) -> JsonResponse:
    return JsonResponse(election_json(get_object_or_404(_elections(), name=name)))


@api_login_required
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


@api_login_required
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
