"""The channel layer (Redis in production) is for fan-out and commands only: its absence must
never refuse an agent or stop ingest.

``LayerGuard`` (one per server process) remembers which groups this process's consumers
belong to. Joining while Redis is away succeeds later: a watch retries every second and
joins every remembered group once Redis answers. Redis keeps nothing across a restart
(group memberships included), so the watch also notices a restart (a new ``run_id``) and
joins again at once; and it renews every membership periodically, as groups expire.

``healthy()`` tells the command service whether a command can be delivered now, so a
step-down requested while Redis is away fails with that reason instead of waiting to expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from channels.layers import get_channel_layer

from elections.per_loop import PerLoop

log = logging.getLogger(__name__)

#: Seconds between checks of the layer, and between renewals of every membership.
CHECK_EVERY = 1.0
RENEW_EVERY = 300.0

_healthy = True


async def receive(
    channel_layer: Any, channel: str, logger: logging.Logger, level: int, what: str
) -> dict[str, Any]:
    """The next message on ``channel``. While the layer is away, each failure is logged (at
    ``level``, as ``what`` failed) and retried after a back-off from 0.5 s doubling to 5 s."""
    delay = 0.5
    while True:
        try:
            return await channel_layer.receive(channel)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.log(level, "%s (%s); retrying", what, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def healthy() -> bool:
    """Whether this process's channel layer answered its last check (any thread may ask)."""
    return _healthy


def _set_healthy(value: bool) -> None:
    global _healthy
    if value != _healthy:
        log.warning("channel layer %s", "is back" if value else "is unavailable")
    _healthy = value


class LayerGuard:
    def __init__(self) -> None:
        self.layer = get_channel_layer()
        self.groups: dict[str, set[str]] = {}  # channel -> groups
        self._run_id: str | None = None
        self._task: asyncio.Task[None] | None = None
        self.recovered: list[Any] = []  # callbacks run (no arguments) after an outage

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="layer watch")

    async def add(self, channel: str, group: str) -> bool:
        """Join ``group`` now if the layer answers, else as soon as it does."""
        self.start()
        self.groups.setdefault(channel, set()).add(group)
        try:
            await self.layer.group_add(group, channel)
        except Exception as exc:
            log.warning("could not join %s now (%s); will join when the layer is back", group, exc)
            _set_healthy(False)
            return False
        return True

    async def discard(self, channel: str) -> None:
        for group in self.groups.pop(channel, set()):
            with contextlib.suppress(Exception):  # nothing to clean when the layer is away
                await self.layer.group_discard(group, channel)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        renewed = loop.time()
        while True:
            await asyncio.sleep(CHECK_EVERY)
            restarted = False
            try:
                run_id = await self._server_id()
            except Exception:
                _set_healthy(False)
                continue
            if run_id is not None and self._run_id is not None and run_id != self._run_id:
                restarted = True  # Redis came back empty: every membership is gone
            self._run_id = run_id
            due = not _healthy or restarted or loop.time() - renewed >= RENEW_EVERY
            if due and await self._join_all():
                was_down = not _healthy or restarted
                _set_healthy(True)
                renewed = loop.time()
                if was_down:
                    for callback in list(self.recovered):
                        callback()

    async def _server_id(self) -> str | None:
        """Redis's run id (it changes on a restart); None for an in-memory layer."""
        connection = getattr(self.layer, "connection", None)
        if connection is None:
            return None
        info = await asyncio.wait_for(connection(0).info("server"), timeout=2)
        return str(info.get("run_id"))

    async def _join_all(self) -> bool:
        try:
            for channel, groups in list(self.groups.items()):
                for group in groups:
                    await self.layer.group_add(group, channel)
        except Exception as exc:
            log.info("channel layer still unavailable: %s", exc)
            return False
        return True


#: The guard of the running event loop (one per server process).
guard = PerLoop(LayerGuard)
