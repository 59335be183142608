"""Small asyncio helpers the agent's parts share."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancelled(task: asyncio.Task[Any] | None) -> None:
    """Cancel a helper task (a watch) and wait for it to end, whatever it raised: it only
    helped, and its owner goes on without it."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
