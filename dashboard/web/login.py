"""Sign-in with failed attempts throttled (``dashboard.throttle``) and audited."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import AuthenticationForm
from django.core.exceptions import ValidationError
from django.http import HttpResponse

from dashboard.auth import client_ip
from dashboard.web import throttle
from elections import audit


class ThrottledLoginForm(AuthenticationForm):
    error_messages = {
        **AuthenticationForm.error_messages,
        "throttled": "Too many failed sign-ins for this account or from this address: "
        f"try again in {throttle.WINDOW // 60} minutes.",
    }

    def clean(self) -> dict[str, Any]:
        username = str(self.cleaned_data.get("username") or "")
        ip = client_ip(self.request)
        if throttle.blocked(username, ip):
            # The password is not even checked: a guesser learns nothing more.
            audit.record(audit.Actor.USER, username, audit.Action.LOGIN_THROTTLED, ip=ip)
            raise ValidationError(self.error_messages["throttled"], code="throttled")
        try:
            cleaned = super().clean()
        except ValidationError:
            throttle.failed(username, ip)
            raise
        throttle.succeeded(username)
        return cleaned


class LoginView(auth_views.LoginView):
    form_class = ThrottledLoginForm

    def form_invalid(self, form: AuthenticationForm) -> HttpResponse:
        response = super().form_invalid(form)
        if any(e.code == "throttled" for e in form.non_field_errors().as_data()):
            response.status_code = 429
        return response
