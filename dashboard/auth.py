"""Who is asking: request authentication for the UI and the JSON API, and the peer address.

Every view that accepts an API token goes through ``api_auth`` (or ``session_or_bearer`` for
downloads a browser also opens), so the rules live in one place:

- ``Authorization: Bearer <API token>`` acts as the token's user and needs no CSRF token (a
  browser never adds that header on its own); a bearer header wins over a session cookie, and
  a bad one is refused even with a session;
- otherwise the session must be logged in, and unsafe methods keep Django's CSRF check;
- failures answer 401/403 in JSON, with ``WWW-Authenticate`` as RFC 6750 asks.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from inspect import iscoroutinefunction
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from elections import actions, tokens

View = Callable[..., Any]


def client_ip(request: Any) -> str | None:
    """The peer address of a request (REMOTE_ADDR; proxies' headers are not trusted: a
    deployment behind a proxy sets it from the proxy, e.g. daphne --proxy-headers)."""
    return getattr(request, "META", {}).get("REMOTE_ADDR") or None


class _CsrfCheck(CsrfViewMiddleware):
    def _reject(self, request: HttpRequest, reason: str) -> str:  # type: ignore[override]
        return reason  # the reason, not Django's HTML 403 page: the API answers in JSON


def _csrf_failure(request: HttpRequest) -> str | None:
    """Why a session-authenticated request fails the CSRF check, or None when it passes."""
    check = _CsrfCheck(lambda request: HttpResponse())
    check.process_request(request)
    return check.process_view(request, None, (), {})  # type: ignore[return-value]


def _unauthorized(message: str, params: str = "") -> JsonResponse:
    response = JsonResponse({"error": message}, status=401)
    response["WWW-Authenticate"] = f'Bearer realm="electorate"{", " + params if params else ""}'
    return response


def _is_bearer(request: HttpRequest) -> bool:
    return request.headers.get("Authorization", "").split(" ", 1)[0].lower() == "bearer"


def _refusal(request: HttpRequest) -> JsonResponse | None:
    """Authenticate ``request`` in place; the response to send instead, if it may not pass."""
    if _is_bearer(request):
        token = tokens.bearer({"Authorization": request.headers["Authorization"]})
        user = actions.authenticate_api_token(token) if token else None
        if user is None:
            return _unauthorized("invalid or revoked API token", 'error="invalid_token"')
        request.user = user
    elif not request.user.is_authenticated:
        return _unauthorized("authentication required")
    elif (reason := _csrf_failure(request)) is not None:
        return JsonResponse({"error": f"CSRF check failed: {reason}"}, status=403)
    return None


def api_auth(view: View) -> View:
    """Session or bearer token; 401 JSON when neither holds (sync and async views)."""
    if iscoroutinefunction(view):

        @wraps(view)
        async def async_wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
            refused = await sync_to_async(_refusal)(request)
            return refused if refused is not None else await view(request, *args, **kwargs)

        return csrf_exempt(async_wrapper)

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        refused = _refusal(request)
        return refused if refused is not None else view(request, *args, **kwargs)

    return csrf_exempt(wrapper)


def session_or_bearer(view: View) -> View:
    """A browser is sent to the login page; a script may use its API token instead."""
    by_session, by_token = login_required(view), api_auth(view)

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        if _is_bearer(request):
            return by_token(request, *args, **kwargs)
        return by_session(request, *args, **kwargs)

    return wrapper
