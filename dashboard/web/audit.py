"""The audit log page and the streamed exports. Thin: parse the filter, query, answer."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from dashboard import exports
from dashboard.auth import session_or_bearer


@require_GET
@login_required
def audit_log(request: HttpRequest) -> HttpResponse:
    context: dict[str, Any] = {
        "params": {k: request.GET.get(k, "") for k in exports.Filter.NAMES},
        "actions": exports.KNOWN_ACTIONS,
    }
    try:
        flt = exports.Filter.from_query(request.GET)
        before = exports.parse_int(
            request.GET.get("before"), "before", low=1, high=2**63 - 1, default=None
        )
    except exports.BadFilter as bad:
        return render(request, "audit/log.html", {**context, "error": str(bad)}, status=400)
    entries, next_before = exports.audit_page(flt, before, exports.PAGE_SIZE)
    return render(
        request,
        "audit/log.html",
        {
            **context,
            "entries": entries,
            "query": flt.query_string(),
            "older": flt.query_string(before=next_before) if next_before else None,
            "paged": before is not None,
        },
    )


@require_GET
@session_or_bearer
def export(request: HttpRequest, kind: str, fmt: str) -> HttpResponse:
    try:
        flt = exports.Filter.from_query(request.GET)
    except exports.BadFilter as bad:
        return HttpResponse(f"{bad}\n", status=400, content_type="text/plain; charset=utf-8")
    return exports.export_response(request, kind, fmt, flt)
