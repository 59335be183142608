"""How a backend fails: the three errors the runner tells apart, and the one-line messages they
carry. Kept apart from the contract in ``base.py`` so that a backend imports each in one line."""

from __future__ import annotations


class BackendError(Exception):
    """Base for backend failures."""


class Lost(BackendError):
    """Leadership is gone for certain (a compare-and-set failed, the session or lease died)."""


class Unavailable(BackendError):
    """The backend could not be reached or did not answer: leadership is unknown, not lost."""


class Misconfigured(BackendError):
    """The backend refuses this configuration (e.g. a NATS bucket whose TTL disagrees)."""


def describe(exc: BaseException) -> str:
    """An error in one line: the first line of its text, or its type when it has none."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def unavailable(what: str, why: BaseException | str) -> Unavailable:
    """What a backend raises, ``from None``, when its client fails: ``what`` failed and why, in
    one line. Not chained: the client's traceback says nothing the message does not, and the
    runner only logs the message and retries."""
    return Unavailable(f"{what}: {why if isinstance(why, str) else describe(why)}")
