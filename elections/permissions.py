"""Who may steer elections, and the refusal every steering action raises.

Step-down, switchover, pause, cancel and forget need one permission, ``force_stepdown`` on
elections (granted through the ``operators`` group); reading needs only a login.
"""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser

from elections.models import FORCE_STEPDOWN

#: The permission as ``user.has_perm`` takes it.
PERMISSION = f"elections.{FORCE_STEPDOWN}"

User = AbstractBaseUser | AnonymousUser | None


class Refused(Exception):
    """The action cannot be done; ``status`` is the HTTP status the API answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def can_operate(user: User) -> bool:
    return user is not None and user.is_authenticated and user.has_perm(PERMISSION)


def require_operator(user: User) -> None:
    if not can_operate(user):
        raise Refused(403, f"you need the {FORCE_STEPDOWN} permission (the operators group)")


def actor(user: User) -> str:
    """The name the audit log gives a user."""
    return user.get_username() if user is not None and user.is_authenticated else "anonymous"
