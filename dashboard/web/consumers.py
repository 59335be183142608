"""The browser's live websocket (``/ws/live/``): joins the process's live hub, for the map
(its filter and page in the query) or one election's page (``?election=<id>``).

Thin: the hub (``dashboard.live``) renders and sends; the page only acks the frames it has
applied (``{"ack": N}``), which is how the hub knows a browser has fallen behind.
"""

from __future__ import annotations

import json

from django.http import QueryDict

from dashboard.web.electionpage import ElectionView
from dashboard.web.leadermap import MapView
from dashboard.web.live import Viewer, hub
from elections.websocket import BaseConsumer


class LiveConsumer(BaseConsumer):
    viewer: Viewer | None = None

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        query = QueryDict(self.scope.get("query_string", b"").decode("latin-1"))
        await self.accept()
        view = ElectionView.from_query(query) if "election" in query else None
        self.viewer = hub().join(self, view or MapView.from_query(query))

    async def disconnect(self, code: int) -> None:
        if self.viewer is not None:
            hub().leave(self.viewer)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Acks only; commands go through hx-post forms with CSRF."""
        if self.viewer is None or not text_data:
            return
        try:
            seq = json.loads(text_data).get("ack")
        except (ValueError, AttributeError):
            return
        if isinstance(seq, int):
            hub().ack(self.viewer, seq)
