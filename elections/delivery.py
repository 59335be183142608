"""Commands over the channel layer: handing a step-down to its agents, and telling whoever
waits (the API, the CLI) the moment a command ends.

Each command has a group of its own (``command.<id>``): ``commands`` announces the final
status there on commit, and ``wait_final`` listens, so a pending step-down costs the API no
thread and no database connection while it waits. The database stays the truth: the waiter
reads it after joining the group (no race with an answer that came first) and every
``RECHECK`` seconds (a CLI in another process on the in-memory layer hears nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from channels.layers import get_channel_layer
from django.db import transaction

from elections.broadcast import agent_group, group_send
from elections.db import run_db
from elections.models import Command

log = logging.getLogger(__name__)

#: Seconds between database reads while waiting, in case no message comes.
RECHECK = 1.0
#: The longest joining or leaving a command's group may take (the layer may be away).
SUBSCRIBE_TIMEOUT = 2.0


def command_group(command_id: int) -> str:
    return f"command.{command_id}"


def send(frame: str, agent_ids: list[str], on_failure: Callable[[Exception], None]) -> None:
    """Hand ``frame`` to each agent's group, in order; ``on_failure`` if the layer refuses."""
    for agent_id in agent_ids:
        group_send(
            agent_group(agent_id), {"type": "agent.command", "frame": frame}, on_error=on_failure
        )


def announce_final(command: Command) -> None:
    """On commit, wake whoever waits for this command (inside the transaction that ends it)."""
    pk, status = command.pk, command.status
    transaction.on_commit(
        lambda: group_send(command_group(pk), {"type": "command.final", "status": status})
    )


def _load(command_id: int) -> Command:
    return Command.objects.select_related("election", "requested_by").get(pk=command_id)


def _settled(command: Command) -> bool:
    return command.final or command.status == Command.Status.SCHEDULED


async def wait_final(command_id: int, timeout: float) -> Command:
    """The command once it is final (or scheduled), or as it stands after ``timeout``."""
    deadline = time.monotonic() + timeout
    command = await run_db(_load, command_id)
    if _settled(command) or timeout <= 0:
        return command  # most refusals and failures: no need to touch the channel layer
    layer = get_channel_layer()
    group = command_group(command_id)
    channel = await _subscribe(layer, group, min(SUBSCRIBE_TIMEOUT, timeout))
    try:
        while True:
            # Read after joining the group: an answer that came before is not missed.
            command = await run_db(_load, command_id)
            left = deadline - time.monotonic()
            if _settled(command) or left <= 0:
                return command
            pause = min(RECHECK, left)
            if channel is None:
                await asyncio.sleep(pause)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(layer.receive(channel), pause)
    finally:
        if channel is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(layer.group_discard(group, channel), SUBSCRIBE_TIMEOUT)


async def _subscribe(layer: Any, group: str, timeout: float) -> str | None:
    """A channel in ``group``, or None when there is no layer or it does not answer in time
    (Redis away: the rechecks alone will do, and the request is not held up by it)."""
    if layer is None:
        return None
    try:
        channel = await layer.new_channel()
        await asyncio.wait_for(layer.group_add(group, channel), timeout)
    except Exception as exc:
        log.info("waiting on %s without the channel layer: %s", group, exc)
        return None
    return channel
