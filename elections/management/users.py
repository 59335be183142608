"""What the API-token commands share: one user, named on the command line."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser


class UserCommand(BaseCommand):
    """A management command about the user USERNAME."""

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")

    def user(self, username: str) -> Any:
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"no user {username!r}")
        return user
