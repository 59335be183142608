"""Sign-ins and sign-outs land in the audit log (Django's auth signals, connected when the
web app is ready)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.dispatch import receiver
from django.http import HttpRequest

from dashboard.auth import client_ip
from elections import audit


@receiver(user_logged_in, dispatch_uid="electorate-audit-login")
def logged_in(sender: Any, request: HttpRequest | None, user: Any, **kwargs: Any) -> None:
    audit.record(audit.Actor.USER, user.get_username(), audit.Action.LOGIN, ip=client_ip(request))


@receiver(user_logged_out, dispatch_uid="electorate-audit-logout")
def logged_out(sender: Any, request: HttpRequest | None, user: Any, **kwargs: Any) -> None:
    if user is None:  # logging out without a session: nobody to name
        return
    audit.record(audit.Actor.USER, user.get_username(), audit.Action.LOGOUT, ip=client_ip(request))


@receiver(user_login_failed, dispatch_uid="electorate-audit-login-failed")
def login_failed(
    sender: Any, credentials: dict[str, Any], request: HttpRequest | None = None, **kwargs: Any
) -> None:
    # Django has already masked the password in ``credentials``; only the name is kept.
    username = str(credentials.get("username") or "")
    audit.record(audit.Actor.USER, username, audit.Action.LOGIN_FAILED, ip=client_ip(request))
