"""The browser's live websocket (``/ws/live/``): out-of-band HTML swaps for the leader map.

Changes are coalesced per connection over a short window, so a burst of events becomes one
update; every (re)connect starts with a full snapshot because a Redis channel layer may drop
messages for a channel that is over capacity.
"""

from __future__ import annotations

import asyncio

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.http import QueryDict

from dashboard import leadermap
from elections.broadcast import FLEET_GROUP


class LiveConsumer(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        self.filter = leadermap.MapFilter.from_query(
            QueryDict(self.scope.get("query_string", b"").decode("latin-1"))
        )
        self.can_operate = await database_sync_to_async(user.has_perm)("elections.force_stepdown")
        self.pending: set[int] = set()
        self.shown: set[int] = set()
        self.flusher: asyncio.Task[None] | None = None
        await self.accept()
        await self.channel_layer.group_add(FLEET_GROUP, self.channel_name)
        html, self.shown = await database_sync_to_async(leadermap.render_snapshot)(
            self.filter, self.can_operate
        )
        await self.send(text_data=html)

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(FLEET_GROUP, self.channel_name)
        if getattr(self, "flusher", None):
            self.flusher.cancel()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """The page sends nothing; commands go through hx-post forms with CSRF."""

    async def fleet_changed(self, message: dict[str, list[int]]) -> None:
        self.pending.update(message["elections"])
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        while self.pending:
            await asyncio.sleep(settings.ELECTORATE_LIVE_COALESCE)
            ids, self.pending = self.pending, set()
            html, self.shown = await database_sync_to_async(leadermap.render_update)(
                ids, self.filter, self.shown, self.can_operate
            )
            await self.send(text_data=html)
