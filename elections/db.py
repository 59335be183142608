"""ORM work from async code, on a bounded pool of threads.

channels' ``database_sync_to_async`` is thread-sensitive by default: every consumer of a
process then queues on one thread, and one slow query holds every agent's ack. Here each
call takes any free thread of a pool (each thread keeps its own database connection), so
work for different agents runs side by side. Work that must run in order for one agent is
awaited in order by that agent's consumer.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from channels.db import database_sync_to_async
from django.conf import settings

P = ParamSpec("P")
R = TypeVar("R")

_pool: ThreadPoolExecutor | None = None


def pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(
            max_workers=settings.ELECTORATE_DB_THREADS, thread_name_prefix="electorate-db"
        )
    return _pool


async def run_db(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run ``fn`` on the pool; stale connections are closed before and after, as channels does."""
    call = database_sync_to_async(fn, thread_sensitive=False, executor=pool())
    return await call(*args, **kwargs)
