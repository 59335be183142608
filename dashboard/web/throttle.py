"""Failed sign-ins are throttled per username and per client address.

After ``USER_LIMIT`` failures for one username, or ``ADDRESS_LIMIT`` from one address, within
``WINDOW`` seconds, sign-in attempts for it are refused (without checking the password) until
the window has passed. Counts live in the cache: Redis in production, shared by every
process. A successful sign-in clears the username's count.
"""

from __future__ import annotations

import hashlib

from django.core.cache import cache

WINDOW = 15 * 60
USER_LIMIT = 5
ADDRESS_LIMIT = 20


def _keys(username: str, ip: str | None) -> list[tuple[str, int]]:
    user = hashlib.sha256(username.strip().lower().encode()).hexdigest()[:32]
    keys = [(f"electorate:login-failed:user:{user}", USER_LIMIT)]
    if ip:
        keys.append((f"electorate:login-failed:ip:{ip}", ADDRESS_LIMIT))
    return keys


def failed(username: str, ip: str | None) -> None:
    for key, _ in _keys(username, ip):
        cache.add(key, 0, WINDOW)
        try:
            cache.incr(key)
        except ValueError:  # expired between add and incr
            cache.set(key, 1, WINDOW)


def blocked(username: str, ip: str | None) -> bool:
    counts = cache.get_many([key for key, _ in _keys(username, ip)])
    return any(counts.get(key, 0) >= limit for key, limit in _keys(username, ip))


def succeeded(username: str) -> None:
    cache.delete(_keys(username, None)[0][0])
