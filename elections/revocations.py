"""Revoked agent tokens disconnect their agents at once, on every server process.

Each process checks once a second which tokens were revoked since its last look (one query,
whatever the number of agents) and closes the sockets that authenticated with them. This
needs no channel layer, so it also works when the revocation comes from the command line
in embedded mode, or while Redis is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta

from django.utils import timezone

from elections.db import run_db
from elections.models import AgentToken
from elections.per_loop import PerLoop

log = logging.getLogger(__name__)

CHECK_EVERY = 1.0


class Revocations:
    def __init__(self) -> None:
        self.sockets: dict[str, set[object]] = {}  # token digest -> consumers
        self._task: asyncio.Task[None] | None = None

    def watch(self, digest: str, consumer: object) -> None:
        self.sockets.setdefault(digest, set()).add(consumer)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="revocations")

    def forget(self, digest: str, consumer: object) -> None:
        sockets = self.sockets.get(digest)
        if sockets is not None:
            sockets.discard(consumer)
            if not sockets:
                del self.sockets[digest]

    async def _run(self) -> None:
        since = timezone.now()
        while True:
            await asyncio.sleep(CHECK_EVERY)
            if not self.sockets:
                continue
            try:
                revoked, since = await run_db(_revoked_since, since)
            except Exception as exc:  # the database is away: look again next time
                log.info("could not check revoked tokens: %s", exc)
                continue
            for digest in revoked:
                for consumer in list(self.sockets.pop(digest, ())):
                    with contextlib.suppress(Exception):
                        await consumer.revoked()  # type: ignore[attr-defined]


def _revoked_since(since: datetime) -> tuple[set[str], datetime]:
    # A little overlap: a revocation committed just before the clock read is not missed.
    now = timezone.now()
    digests = set(
        AgentToken.objects.filter(revoked__gte=since - timedelta(seconds=2)).values_list(
            "digest", flat=True
        )
    )
    return digests, now


#: The revocation list of the running event loop (one per server process).
revocations = PerLoop(Revocations)
