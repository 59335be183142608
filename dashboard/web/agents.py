"""The agents pages: every agent with its memberships, zombies flagged, the orphan elections,
and the operator's *forget* actions (a confirmation page, then a POST).

Each page costs a fixed number of queries: agents come 100 a page with their membership and
zombie counts computed in the same query; an agent's page is one query for its memberships.
"""

from __future__ import annotations

from collections.abc import Callable

from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone

from dashboard.auth import client_ip
from elections import clock, forget
from elections.models import Agent, Election, Membership
from elections.permissions import Refused, can_operate
from elections.zombies import orphans, with_zombie_flag, zombie_q

PAGE_SIZE = 100
#: Orphans listed on the agents page (the count covers all).
ORPHANS_SHOWN = 50


def skew_of(agent: Agent) -> tuple[str, bool]:
    """The agent's clock skew against the dashboard as text, and whether it is flagged."""
    if agent.clock_skew is None:
        return "", False
    return f"{agent.clock_skew:+.3f} s", clock.skewed(agent.clock_skew)


@login_required
def agent_list(request: HttpRequest) -> HttpResponse:
    now = timezone.now()
    agents = (
        Agent.objects.filter(forgotten__isnull=True)
        .annotate(
            members=Count("memberships"),
            zombies=Count("memberships", filter=zombie_q(now, "memberships__", "")),
        )
        .order_by("id")
    )
    paginator = Paginator(agents, PAGE_SIZE)
    page = paginator.get_page(request.GET.get("page"))
    rows = [(a, *skew_of(a)) for a in page.object_list]
    orphan_list = list(orphans(now).values_list("name", "backend", "last_report")[:ORPHANS_SHOWN])
    first = (page.number - 1) * PAGE_SIZE + 1
    return render(
        request,
        "agents/list.html",
        {
            "rows": rows,
            "pager": {
                "first": first if rows else 0,
                "last": first + len(rows) - 1,
                "total": paginator.count,
                "page": page.number,
                "pages": paginator.num_pages,
                "prev": f"page={page.number - 1}" if page.has_previous() else None,
                "next": f"page={page.number + 1}" if page.has_next() else None,
            },
            "orphans": orphan_list,
            "orphan_total": orphans(now).count(),
            "can_operate": can_operate(request.user),
            "now": now,
        },
    )


@login_required
def agent_detail(request: HttpRequest, agent_id: str) -> HttpResponse:
    agent = get_object_or_404(Agent, pk=agent_id, forgotten__isnull=True)
    now = timezone.now()
    members = list(
        with_zombie_flag(
            Membership.objects.filter(agent=agent).select_related("election", "agent"), now
        ).order_by("election__name")
    )
    return render(
        request,
        "agents/detail.html",
        {
            "a": agent,
            "skew": skew_of(agent),
            "members": members,
            "zombies": sum(1 for m in members if m.zombie),
            "can_operate": can_operate(request.user),
        },
    )


def _confirm(
    request: HttpRequest, what: str, consequence: str, back: str, run: Callable[[], None]
) -> HttpResponse:
    """GET: the confirmation page; POST: do it (403 without the permission, 409 if alive)."""
    if not can_operate(request.user):
        return HttpResponse("you need the force_stepdown permission", status=403)
    if request.method == "POST":
        try:
            run()
        except Refused as refused:
            return HttpResponse(refused.message, status=refused.status)
        return redirect(back)
    return render(
        request, "agents/confirm.html", {"what": what, "consequence": consequence, "back": back}
    )


@login_required
def forget_membership(request: HttpRequest, pk: int) -> HttpResponse:
    member = get_object_or_404(Membership.objects.select_related("election"), pk=pk)
    back = reverse("agent", args=[member.agent_id])
    return _confirm(
        request,
        f"the membership of {member.agent_id} in {member.election.name}",
        "The dashboard stops counting this agent as a member of the election. If the agent "
        "names the election again in a hello, it becomes a member again.",
        back,
        lambda: forget.forget_membership(request.user, pk, ip=client_ip(request)),
    )


@login_required
def forget_election(request: HttpRequest, name: str) -> HttpResponse:
    get_object_or_404(Election, name=name)
    return _confirm(
        request,
        f"the election {name}",
        "The election is deleted with its terms, campaign history and commands (the audit "
        "log keeps what happened). An agent that reports it again creates it anew.",
        reverse("agents"),
        lambda: forget.forget_election(request.user, name, ip=client_ip(request)),
    )


@login_required
def forget_agent(request: HttpRequest, agent_id: str) -> HttpResponse:
    get_object_or_404(Agent, pk=agent_id, forgotten__isnull=True)
    return _confirm(
        request,
        f"the agent {agent_id}",
        "Its memberships are dropped and it leaves the agents page; its terms stay in the "
        "history and its tokens stay valid (revoke them with manage.py revoke_agent_token). "
        "If it connects again, it comes back.",
        reverse("agents"),
        lambda: forget.forget_agent(request.user, agent_id, ip=client_ip(request)),
    )
