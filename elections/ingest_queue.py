"""Group commit: events frames from many agents stored in one transaction.

Each agent's consumer awaits its frame's result in order; the frames waiting at the same
moment, from any agents, go to the database together (``ingest.ingest_frames``), so a burst
of 1,000 agents costs a few transactions instead of 1,000. Several writers run at once, so
one slow transaction (a lock wait, a slow disk) holds only the frames it carries. A batch
that fails is retried frame by frame: one bad frame fails alone.
"""

from __future__ import annotations

import asyncio
import logging
import time

from elections import meters
from elections.db import run_db
from elections.ingest import Frame, IngestResult, ingest_frames
from elections.per_loop import PerLoop

log = logging.getLogger(__name__)

#: Transactions in flight at once, per process.
WRITERS = 3
#: Events per transaction at most (about 10 ms of database time each).
MAX_EVENTS = 2000


class IngestQueue:
    def __init__(self, writers: int = WRITERS, max_events: int = MAX_EVENTS) -> None:
        self.max_events = max_events
        #: (frame, its result, when it arrived: the start of its ingest lag)
        self._queue: asyncio.Queue[tuple[Frame, asyncio.Future[IngestResult], float]] = (
            asyncio.Queue()
        )
        meters.flusher()  # the counts this queue adds reach the database once a second
        self._writers = [
            asyncio.get_running_loop().create_task(self._write(), name=f"ingest writer {i}")
            for i in range(writers)
        ]

    async def submit(self, frame: Frame) -> IngestResult:
        """Store a frame; returns once it is committed (or raises why it could not be)."""
        done: asyncio.Future[IngestResult] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((frame, done, time.monotonic()))
        return await done

    async def stop(self) -> None:
        """Stop the writers (frames still queued are not stored: their agents resend them)."""
        for writer in self._writers:
            writer.cancel()
        await asyncio.gather(*self._writers, return_exceptions=True)

    async def _write(self) -> None:
        while True:
            batch = [await self._queue.get()]
            events = len(batch[0][0].events)
            while events < self.max_events and not self._queue.empty():
                item = self._queue.get_nowait()
                batch.append(item)
                events += len(item[0].events)
            try:
                started = time.monotonic()
                results = await run_db(ingest_frames, [frame for frame, _, _ in batch])
                log.debug(
                    "batch %d frames %d events %.1f ms",
                    len(batch),
                    events,
                    (time.monotonic() - started) * 1000,
                )
            except Exception:
                if len(batch) == 1:
                    _fail(batch[0][1], batch[0][0])
                    continue
                for frame, done, arrived in batch:
                    try:
                        [result] = await run_db(ingest_frames, [frame])
                    except Exception:
                        _fail(done, frame)
                    else:
                        _count([(frame, arrived)], [result])
                        _resolve(done, result)
            else:
                _count([(frame, arrived) for frame, _, arrived in batch], results)
                for (_, done, _), result in zip(batch, results, strict=True):
                    _resolve(done, result)


def _count(frames: list[tuple[Frame, float]], results: list[IngestResult]) -> None:
    """Committed frames into the process's meter: events, events stored, each frame's lag."""
    committed = time.monotonic()
    meters.meter.ingested(
        len(frames), sum(len(f.events) for f, _ in frames), sum(r.stored for r in results)
    )
    meters.meter.lags(committed - arrived for _, arrived in frames)


def _resolve(done: asyncio.Future[IngestResult], result: IngestResult) -> None:
    if not done.done():
        done.set_result(result)


def _fail(done: asyncio.Future[IngestResult], frame: Frame) -> None:
    log.exception("could not store %d event(s) of agent %s", len(frame.events), frame.agent_id)
    if not done.done():
        done.set_exception(IngestFailed(f"could not store the events of {frame.agent_id}"))


class IngestFailed(Exception):
    """The database refused or could not take a frame; the agent should resend it later."""


#: The queue of the running event loop (one per server process).
ingest_queue = PerLoop(IngestQueue)
