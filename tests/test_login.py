"""Sign-in: failed attempts are throttled per user and per address, and audited."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.core.cache import cache
from django.test import Client

from dashboard.web import throttle
from elections.models import AuditEntry

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fresh_counts() -> Iterator[None]:
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def ann(django_user_model):
    return django_user_model.objects.create_user("ann", password="right-password-1")


def attempt(client: Client, username: str, password: str, ip: str = "10.0.0.1") -> int:
    response = client.post("/login/", {"username": username, "password": password}, REMOTE_ADDR=ip)
    return response.status_code


def test_repeated_failures_lock_the_account_out_even_with_the_right_password(ann) -> None:
    client = Client()
    for _ in range(throttle.USER_LIMIT):
        assert attempt(client, "ann", "wrong") == 200  # the form again, with an error
    response = client.post(
        "/login/", {"username": "ann", "password": "right-password-1"}, REMOTE_ADDR="10.0.0.9"
    )
    assert response.status_code == 429
    assert "Too many failed sign-ins" in response.content.decode()
    assert "_auth_user_id" not in client.session
    assert AuditEntry.objects.filter(action="login-throttled", actor="ann").count() == 1


def test_one_address_guessing_many_names_is_stopped(django_user_model) -> None:
    django_user_model.objects.create_user("bob", password="right-password-2")
    client = Client()
    for i in range(throttle.ADDRESS_LIMIT):
        attempt(client, f"nobody-{i}", "wrong", ip="10.0.0.66")
    assert attempt(client, "bob", "right-password-2", ip="10.0.0.66") == 429
    assert attempt(client, "bob", "right-password-2", ip="10.0.0.67") == 302  # elsewhere: fine


def test_a_success_clears_the_count(ann) -> None:
    client = Client()
    for _ in range(throttle.USER_LIMIT - 1):
        attempt(client, "ann", "wrong")
    assert attempt(client, "ann", "right-password-1") == 302
    client.logout()
    for _ in range(throttle.USER_LIMIT - 1):
        attempt(client, "ann", "wrong")
    assert attempt(client, "ann", "right-password-1") == 302
