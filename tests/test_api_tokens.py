"""API tokens: issued once and stored hashed, bearer auth as the token's user, revocation."""

from __future__ import annotations

import io
from typing import Any

import pytest
from django.contrib.auth.models import AnonymousUser
from django.core.management import CommandError, call_command
from django.http import HttpRequest, JsonResponse
from django.test import Client, RequestFactory

from dashboard.auth import api_auth
from elections import audit
from elections.models import ApiToken, AuditEntry
from elections.tokens import digest

pytestmark = pytest.mark.django_db


@pytest.fixture
def ann(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user("ann", password="x" * 12)


def create_token(username: str) -> str:
    out = io.StringIO()
    call_command("create_api_token", username, stdout=out)
    return out.getvalue().strip()


def bearer(token: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


def test_a_token_is_printed_once_stored_hashed_and_its_issue_audited(ann: Any) -> None:
    token = create_token("ann")
    assert token.startswith("elu_") and len(token) > 40
    row = ApiToken.objects.get()
    assert (row.user, row.digest, row.revoked, row.last_used) == (ann, digest(token), None, None)
    entry = AuditEntry.objects.get()
    assert (entry.actor_type, entry.action, entry.target) == ("system", "api-token-issued", "ann")
    assert entry.actor.startswith("cli")
    assert entry.detail == {"token_id": row.pk}
    assert token not in str(entry.detail) and row.digest != token


def test_an_unknown_user_gets_no_token() -> None:
    with pytest.raises(CommandError, match="no user 'nobody'"):
        create_token("nobody")
    assert not ApiToken.objects.exists() and not AuditEntry.objects.exists()


def test_the_api_accepts_a_bearer_token_as_its_user(client: Client, ann: Any) -> None:
    token = create_token("ann")
    response = client.get("/api/v1/elections", **bearer(token))
    assert response.status_code == 200
    assert response.json() == {"elections": [], "total": 0, "next": None}
    assert ApiToken.objects.get().last_used is not None


@pytest.mark.parametrize(
    "header",
    ["Bearer elu_not-a-real-token", "Bearer ", "bearer elu_wrong", "Bearer a b"],
)
def test_a_wrong_token_gets_a_clear_401(client: Client, ann: Any, header: str) -> None:
    create_token("ann")
    response = client.get("/api/v1/elections", HTTP_AUTHORIZATION=header)
    assert response.status_code == 401
    assert response.json() == {"error": "invalid or revoked API token"}
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_a_bad_token_is_refused_even_with_a_session(client: Client, ann: Any) -> None:
    client.force_login(ann)
    assert client.get("/api/v1/elections").status_code == 200
    assert client.get("/api/v1/elections", **bearer("elu_nope")).status_code == 401


def test_revoking_ends_every_token_of_the_user_and_is_audited(client: Client, ann: Any) -> None:
    first, second = create_token("ann"), create_token("ann")
    out = io.StringIO()
    call_command("revoke_api_token", "ann", stdout=out)
    assert out.getvalue().strip() == "revoked 2 token(s) of ann"
    for token in (first, second):
        response = client.get("/api/v1/agents", **bearer(token))
        assert (response.status_code, response.json()["error"]) == (
            401,
            "invalid or revoked API token",
        )
    assert list(AuditEntry.objects.values_list("action", "target", "detail")) == [
        ("api-token-issued", "ann", {"token_id": ApiToken.objects.order_by("pk")[0].pk}),
        ("api-token-issued", "ann", {"token_id": ApiToken.objects.order_by("pk")[1].pk}),
        ("api-token-revoked", "ann", {"count": 2}),
    ]
    assert audit.verify().ok


def test_an_inactive_users_token_is_refused(client: Client, ann: Any) -> None:
    token = create_token("ann")
    ann.is_active = False
    ann.save()
    assert client.get("/api/v1/elections", **bearer(token)).status_code == 401


def test_without_session_or_token_the_api_answers_401(client: Client) -> None:
    response = client.get("/api/v1/audit")
    assert (response.status_code, response.json()) == (401, {"error": "authentication required"})


@api_auth
def whoami(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"user": request.user.get_username()})


def test_bearer_requests_need_no_csrf_token_but_session_requests_do(ann: Any) -> None:
    token = create_token("ann")
    factory = RequestFactory()  # unlike the test client, it leaves the CSRF check on

    request = factory.post("/api/v1/x", **bearer(token))
    request.user = AnonymousUser()
    assert whoami(request).status_code == 200

    request = factory.post("/api/v1/x")
    request.user = ann
    response = whoami(request)
    assert response.status_code == 403
    assert "CSRF" in response.content.decode()

    request = factory.get("/api/v1/x")
    request.user = ann
    assert whoami(request).status_code == 200


def test_exports_accept_a_bearer_token_too(client: Client, ann: Any) -> None:
    token = create_token("ann")
    response = client.get("/audit/export.ndjson", **bearer(token))
    assert response.status_code == 200
    assert b"api-token-issued" in response.getvalue()
    assert client.get("/audit/export.ndjson").status_code == 302  # a browser: to the login
    assert client.get("/audit/export.ndjson", **bearer("elu_nope")).status_code == 401


@pytest.mark.parametrize(
    "body",
    [
        '{"reason": "x", "hold_off": -1}',
        '{"reason": "x", "hold_off": NaN}',
        '{"reason": "x", "hold_off": 1e9}',
        '{"reason": "x", "hold_off": "soon"}',
        '{"reason": "x", "wait": Infinity}',
    ],
)
def test_the_step_down_api_answers_400_to_values_out_of_range(
    client: Client, ann: Any, body: str
) -> None:
    from django.contrib.auth.models import Group

    ann.groups.add(Group.objects.get(name="operators"))
    response = client.post(
        "/api/v1/elections/no/such/step-down",
        body,
        content_type="application/json",
        **bearer(create_token("ann")),
    )
    assert response.status_code == 400, response.content
    assert "error" in response.json()
