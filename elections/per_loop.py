"""Process-wide helpers that belong to one event loop (the ingest queue, the live hub, ...).

A server process runs one event loop, and its asyncio objects (tasks, events, locks) must not
be touched from another loop; tests start and stop loops many times in one process. So each
such helper is made on first use for the running loop, and forgotten with it.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerLoop(Generic[T]):
    """Call it to get the running loop's instance, made by ``make`` the first time."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._made: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )

    def __call__(self) -> T:
        loop = asyncio.get_running_loop()
        found = self._made.get(loop)
        if found is None:
            found = self._made[loop] = self._make()
        return found

    def forget(self) -> T | None:
        """Drop the running loop's instance (for tests); return it, if there was one."""
        return self._made.pop(asyncio.get_running_loop(), None)
