"""Announce committed changes: to the live map (channel layer group ``fleet``) and to agents
(their own group, for commands).

Actions call ``elections_changed`` inside their transaction; the message goes out only on
commit, so a browser never sees state that was rolled back.

From the server's own threads (the database pool) a message is handed to the server's event
loop and not waited for: a database thread must not sit out a Redis round trip, and must not
block forever on a loop that is shutting down. Elsewhere (a Celery worker, a management
command) it is sent before the call returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from elections import db

log = logging.getLogger(__name__)

FLEET_GROUP = "fleet"


def elections_changed(election_ids: Iterable[int]) -> None:
    ids = sorted(set(election_ids))
    if ids:
        transaction.on_commit(
            lambda: group_send(FLEET_GROUP, {"type": "fleet.changed", "elections": ids})
        )


def agent_group(agent_id: str) -> str:
    """The channel group of one agent's websocket, for commands."""
    return f"agent.{agent_id}"


def group_send(
    group: str,
    message: dict[str, Any],
    *,
    on_error: Callable[[Exception], None] | None = None,
) -> None:
    """Send to a group; a failure is logged and handed to ``on_error`` (from any thread)."""
    layer = get_channel_layer()
    if layer is None:
        return
    loop = db.server_loop()
    if loop is None or not loop.is_running():
        try:
            async_to_sync(layer.group_send)(group, message)
        except Exception as exc:
            _failed(exc, on_error)
        return
    future = asyncio.run_coroutine_threadsafe(layer.group_send(group, message), loop)
    future.add_done_callback(
        lambda f: _failed(f.exception(), on_error) if not f.cancelled() and f.exception() else None
    )


def _failed(exc: BaseException | None, on_error: Callable[[Exception], None] | None) -> None:
    # Visibility only for the map: it catches up with a snapshot when the layer is back.
    log.warning("could not send on the channel layer: %s", exc)
    if on_error is not None and isinstance(exc, Exception):
        on_error(exc)
