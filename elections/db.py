"""ORM work from async code, on a bounded pool of threads.

channels' ``database_sync_to_async`` is thread-sensitive by default: every consumer of a
process then queues on one thread, and one slow query holds every agent's ack. Here each
call takes any free thread of a pool (each thread keeps its own database connection), so
work for different agents runs side by side. Work that must run in order for one agent is
awaited in order by that agent's consumer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import close_old_connections

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

_pool: ThreadPoolExecutor | None = None
#: The event loop of this server process, once it has run database work (see broadcast).
_loop: asyncio.AbstractEventLoop | None = None


def pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(
            max_workers=settings.ELECTORATE_DB_THREADS, thread_name_prefix="electorate-db"
        )
    return _pool


def server_loop() -> asyncio.AbstractEventLoop | None:
    return _loop


async def run_db(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run ``fn`` on the pool; stale connections are closed before and after, as channels does."""
    global _loop
    _loop = asyncio.get_running_loop()
    call = database_sync_to_async(fn, thread_sensitive=False, executor=pool())
    return await call(*args, **kwargs)


def submit(fn: Callable[..., object], *args: object) -> None:
    """Run ``fn`` on the pool and do not wait (from any thread, e.g. a callback on the loop)."""

    def call() -> None:
        close_old_connections()
        try:
            fn(*args)
        except Exception:
            log.exception("background database work %s failed", getattr(fn, "__name__", fn))
        finally:
            close_old_connections()

    pool().submit(call)
