"""ORM work from async code, on a bounded pool of threads.

channels' ``database_sync_to_async`` is thread-sensitive by default: every consumer of a
process then queues on one thread, and one slow query holds every agent's ack. Here each
call takes any free thread of a pool (each thread keeps its own database connection), so
work for different agents runs side by side. Work that must run in order for one agent is
awaited in order by that agent's consumer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

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


class PooledConsumer(AsyncWebsocketConsumer):
    """A websocket consumer whose database work all goes through ``run_db``.

    channels' ``dispatch`` closes stale connections before every message through the single
    thread-sensitive thread: one hop per frame, and every frame of every socket of the
    process queues on that thread. ``run_db`` already closes stale connections around each
    call on its own thread, so that hop buys nothing here.
    """

    async def dispatch(self, message: dict[str, Any]) -> None:
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"no handler for message type {message['type']}")
        await handler(message)
