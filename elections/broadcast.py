"""Announce committed changes to the live map (channel layer group ``fleet``).

Actions call ``elections_changed`` inside their transaction; the message goes out only on
commit, so a browser never sees state that was rolled back.
"""

from __future__ import annotations

from collections.abc import Iterable

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

FLEET_GROUP = "fleet"


def elections_changed(election_ids: Iterable[int]) -> None:
    ids = sorted(set(election_ids))
    if ids:
        transaction.on_commit(lambda: _send({"type": "fleet.changed", "elections": ids}))


def _send(message: dict[str, object]) -> None:
    layer = get_channel_layer()
    if layer is not None:
        async_to_sync(layer.group_send)(FLEET_GROUP, message)


def agent_group(agent_id: str) -> str:
    """The channel group of one agent's websocket, for commands."""
    return f"agent.{agent_id}"
