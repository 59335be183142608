"""Step-down, switchover, pause and cancel from the UI: parse the form, call the command
service, render the result. Refusals are shown in the dialog, with their reason; a dry run
shows, in the dialog, who could take over and why the others could not."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from dashboard.auth import client_ip
from elections import commands
from elections.models import Command, Election
from elections.times import parse_until, parse_when


def _form_context(election: Election, **extra: object) -> dict[str, object]:
    return {
        "e": election,
        "candidates": commands.healthy_candidates(election),
        "members": election.memberships.select_related("agent"),
        **extra,
    }


@login_required
def stepdown(request: HttpRequest, name: str) -> HttpResponse:
    election = get_object_or_404(Election.objects.select_related("leader"), name=name)
    if request.method != "POST":
        return render(request, "elections/_stepdown_form.html", _form_context(election))
    try:
        at = parse_when(request.POST.get("at", ""))
    except ValueError:
        return _refused(request, election, 400, "the scheduled time is not a date and time")
    wanted = commands.Request(
        election=name,
        reason=request.POST.get("reason", ""),
        successor=request.POST.get("successor", ""),
        force=request.POST.get("force") == "on",
        drill=request.POST.get("drill") == "on",
        at=at,
    )
    try:
        if request.POST.get("dry_run") == "1":
            run = commands.dry_run(request.user, wanted)
            return render(
                request,
                "elections/_stepdown_form.html",
                _form_context(election, dry_run=run, values=request.POST),
            )
        command = commands.request_stepdown(request.user, wanted, ip=client_ip(request))
    except commands.Refused as refused:
        return _refused(request, election, refused.status, refused.message)
    return render(request, "elections/_command.html", {"c": command, "fresh": True})


def _refused(request: HttpRequest, election: Election, status: int, message: str) -> HttpResponse:
    # htmx swaps only 2xx answers: keep the dialog open with the reason; plain forms get the code.
    return render(
        request,
        "elections/_stepdown_form.html",
        _form_context(election, error=message, values=request.POST),
        status=200 if request.htmx else status,
    )


@login_required
@require_POST
def cancel(request: HttpRequest, pk: int) -> HttpResponse:
    try:
        command = commands.cancel(request.user, pk, ip=client_ip(request))
    except commands.Refused as refused:
        return HttpResponse(refused.message, status=refused.status)
    return render(request, "elections/_command.html", {"c": command})


@login_required
@require_POST
def pause(request: HttpRequest, name: str) -> HttpResponse:
    paused = request.POST.get("paused") == "1"
    try:
        until = parse_until(request.POST.get("until", ""))
    except ValueError as exc:
        return HttpResponse(str(exc), status=400)
    try:
        commands.set_paused(
            request.user,
            name,
            paused,
            request.POST.get("reason", ""),
            ip=client_ip(request),
            until=until,
        )
    except commands.Refused as refused:
        return HttpResponse(refused.message, status=refused.status)
    return redirect("election", name=name)


def recent_commands(election: Election) -> list[Command]:
    return list(election.commands.select_related("requested_by", "target")[:20])
