"""Fixtures shared by the test files (real servers: tests.servers; live dashboards: tests.live)."""

import pytest
from django.test import Client

pytest_plugins = ["tests.servers", "tests.live"]


@pytest.fixture
def sre(django_user_model) -> Client:
    """A signed-in user who may look, not act."""
    client = Client()
    client.force_login(django_user_model.objects.create_user("sre", password="x" * 12))
    return client
