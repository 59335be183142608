"""``POST /api/v1/elections/<name>/step-down``: the command service over JSON.

Body: ``{"reason": str, "successor": str?, "force": bool?, "drill": bool?, "hold_off": float?,
"at": ISO datetime?, "wait": float?}``. Answers with the command once it is final (or
scheduled, or when ``wait`` seconds pass): 200 done, 202 still running or scheduled, 409/412
refused with the reason (412: no healthy candidate), 403 without the permission.

``?dry_run=1`` judges the same request without making it (no command, no message, no audit
entry; no reason needed): every member, whether it could take over and why not, and the
answer the real request would get, whose status it answers with (200: it would be sent).

``POST /api/v1/elections/<name>/pause``: ``{"paused": bool (default true), "reason": str,
"until": ISO time or a length like "2h"?}``: pause for maintenance, optionally until a time
when the election resumes by itself; ``{"paused": false}`` resumes. Answers the election.
"""

from __future__ import annotations

import json
import math

from asgiref.sync import sync_to_async
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_POST

from dashboard.auth import api_auth, client_ip
from elections import commands, delivery
from elections.models import Election
from elections.serializers import command_json, dry_run_json, election_json
from elections.times import parse_until, parse_when

MAX_WAIT = 60.0


@require_POST
@api_auth
async def stepdown(request: HttpRequest, name: str) -> JsonResponse:
    try:
        body = json.loads(request.body or b"{}")
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        wanted = commands.Request(
            election=name,
            reason=str(body.get("reason", "")),
            successor=str(body.get("successor") or ""),
            force=bool(body.get("force", False)),
            drill=bool(body.get("drill", False)),
            hold_off=float(body.get("hold_off", 5.0)),
            at=parse_when(str(body.get("at") or "")),
        )
        wait = float(body.get("wait", 30.0))
        if not (math.isfinite(wait) and 0 <= wait <= MAX_WAIT):
            raise ValueError(f"wait must be between 0 and {MAX_WAIT:.0f} seconds")
    except (ValueError, TypeError) as exc:
        return JsonResponse({"error": f"bad request: {exc}"}, status=400)
    if request.GET.get("dry_run") in ("1", "true", "yes"):
        try:
            run = await sync_to_async(commands.dry_run)(request.user, wanted)
        except commands.Refused as refused:
            return JsonResponse({"error": refused.message}, status=refused.status)
        return JsonResponse(dry_run_json(run), status=run.refused.status if run.refused else 200)
    try:
        command = await sync_to_async(commands.request_stepdown)(
            request.user, wanted, ip=client_ip(request)
        )
    except commands.Refused as refused:
        return JsonResponse({"error": refused.message}, status=refused.status)
    # Async: waiting holds no thread and no database connection, so many step-downs can
    # wait at once; the command's own completion message wakes this request.
    command = await delivery.wait_final(command.pk, wait)
    status = 200 if command.final else 202
    body = await sync_to_async(command_json)(command)
    return JsonResponse({"command": body}, status=status)


@require_POST
@api_auth
def pause(request: HttpRequest, name: str) -> JsonResponse:
    try:
        body = json.loads(request.body or b"{}")
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        paused = bool(body.get("paused", True))
        until = parse_until(str(body.get("until") or ""))
    except (ValueError, TypeError) as exc:
        return JsonResponse({"error": f"bad request: {exc}"}, status=400)
    try:
        commands.set_paused(
            request.user, name, paused, str(body.get("reason", "")), client_ip(request), until
        )
    except commands.Refused as refused:
        return JsonResponse({"error": refused.message}, status=refused.status)
    election = (
        Election.objects.select_related("leader")
        .prefetch_related("memberships__agent")
        .get(name=name)
    )
    return JsonResponse(election_json(election))
