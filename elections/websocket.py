"""The base of Electorate's websocket consumers (agents' and browsers').

What it changes from channels' ``AsyncWebsocketConsumer``, and why:

- No thread hop per message: channels closes stale database connections before every
  message through the single thread-sensitive thread, so every frame of every socket of a
  process queued on that thread. All our database work goes through ``elections.db.run_db``,
  which closes stale connections around each call on its own thread.
- The channel layer may go away (Redis restarting): channels lets the error of its receive
  end the consumer, closing the socket with 1011. Here the receive waits and tries again,
  and groups are joined through ``elections.layer`` (joined later if Redis is away).
- The database may go away too: a socket whose work cannot be done now is closed with 1013
  (try again later), not with a traceback; an agent reconnects with back-off and resends
  from its spool what was not acked.
"""

from __future__ import annotations

import logging
from typing import Any

from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from channels.utils import await_many_dispatch
from django.db import DatabaseError

from elections import layer

log = logging.getLogger(__name__)

#: Close code asking the peer to come back later (nothing it sent unacked is lost).
CLOSE_TRY_AGAIN = 1013


class BaseConsumer(AsyncWebsocketConsumer):
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scope = scope
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        self.channel_name = await self.channel_layer.new_channel()
        self.base_send = send
        try:
            await await_many_dispatch([receive, self._channel_receive], self.dispatch)
        except StopConsumer:
            pass
        finally:
            await layer.guard().discard(self.channel_name)

    async def _channel_receive(self) -> dict[str, Any]:
        return await layer.receive(
            self.channel_layer,
            self.channel_name,
            log,
            logging.DEBUG,
            "channel layer receive failed",
        )

    async def join(self, group: str) -> bool:
        """Join a group now, or as soon as the channel layer is back."""
        return await layer.guard().add(self.channel_name, group)

    async def dispatch(self, message: dict[str, Any]) -> None:
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"no handler for message type {message['type']}")
        try:
            await handler(message)
        except DatabaseError as exc:
            log.warning("database unavailable; closing %s with 1013: %s", self.channel_name, exc)
            await self.close(code=CLOSE_TRY_AGAIN)
            raise StopConsumer from None
