"""The live map and election pages over ``/ws/live/``: one hub per server process, shared by
its browsers.

- The hub alone listens to the channel layer's ``fleet`` group (one channel per process, not
  one per browser) and renders what changed once per distinct view, on the database pool;
  every browser showing that view gets the same fragments. A change after a quiet spell is
  drawn at once; in a burst, changes are collected for ``ELECTORATE_LIVE_COALESCE`` seconds.
- Renders run one at a time, in order, and every fragment is a whole element rendered from
  the database: what a browser receives later is never older than what it has.
- No frame exceeds ``ELECTORATE_LIVE_FRAME_LIMIT`` (the server refuses frames over 1 MiB):
  fragments are packed into frames, and a page of rows is split across frames when it must be.
- Flow control: the page's script acks how many frames it has applied on this socket. A
  browser whose oldest unacked frame is older than ``MAX_LAG`` is behind: it gets no more
  updates, and once it catches up it gets one fresh snapshot instead of the backlog.
- Changes may be lost when the channel layer is away (Redis restarting): the hub re-joins
  its group (``elections.layer``), and every browser then gets a fresh snapshot.
- An election page (``?election=<id>``) gets frames only when that election changed: the hub
  filters the changes it hears, so a busy fleet costs such a page nothing, and each changed
  election's page is rendered once (``electionpage``) for every browser showing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import import_module

from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth import get_user_model

from dashboard.web import electionpage, leadermap
from dashboard.web.electionpage import ElectionView
from dashboard.web.leadermap import MapView, Rendered, ViewState
from elections import layer as elections_layer
from elections.broadcast import FLEET_GROUP
from elections.db import run_db
from elections.per_loop import PerLoop

log = logging.getLogger(__name__)

#: Seconds between checks that every watching browser is still signed in and active.
SESSION_CHECK = 2.0
#: Close code for a browser whose session ended: the page goes to the login form.
CLOSE_SIGNED_OUT = 4401
#: A browser whose oldest unacked frame is older than this is behind (seconds).
MAX_LAG = 1.0


def frame_limit() -> int:
    return settings.ELECTORATE_LIVE_FRAME_LIMIT


def page_redraw() -> float:
    """Seconds after which a quiet election's page is drawn again: its timeline runs up to
    now, and a page must not show an hour-old "now"."""
    return settings.ELECTORATE_LIVE_PAGE_REDRAW


def _kind(part: str) -> str:
    """What a fragment is to the HTML parser: a row, a table body, or anything else."""
    head = part.lstrip()
    if head.startswith("<tr"):
        return "row"
    if head.startswith("<tbody"):
        return "body"
    return "other"


def pack(parts: Iterable[str], limit: int) -> list[str]:
    """Join fragments into as few frames as fit ``limit`` bytes.

    htmx parses a frame in a ``<template>``, where the HTML parser drops a ``<tr>`` that
    follows a ``<div>``, and wraps one that follows a ``</tbody>`` in an implied body with no
    ``hx-swap-oob`` (the update is lost). So rows, table bodies and everything else each travel
    in frames of their own kind; table fragments keep their order (a body replaced, then rows
    appended to it, then single rows updated).
    """
    items = list(parts)
    frames: list[str] = []
    runs: list[tuple[str, list[str]]] = [("other", [p for p in items if _kind(p) == "other"])]
    for part in (p for p in items if _kind(p) != "other"):
        if runs[-1][0] != _kind(part):
            runs.append((_kind(part), []))
        runs[-1][1].append(part)
    for _, run in runs:
        current: list[str] = []
        size = 0
        for part in run:
            length = len(part.encode())
            if current and size + length > limit:
                frames.append("".join(current))
                current, size = [], 0
            if length > limit:
                log.warning("a live fragment of %d bytes exceeds the frame limit", length)
            current.append(part)
            size += length
        if current:
            frames.append("".join(current))
    return frames


@dataclass(eq=False)
class Viewer:
    """One browser: what it shows and how far it is behind."""

    consumer: AsyncWebsocketConsumer
    view: MapView | ElectionView
    state: ViewState | None = None  # None: needs a snapshot
    sent: int = 0
    #: (frame number, when sent) of frames not acked yet, oldest first.
    unacked: deque[tuple[int, float]] = field(default_factory=deque)
    #: Updates were withheld while it was behind: it needs a snapshot once it catches up.
    skipped: bool = False
    #: When it was last sent a frame (monotonic).
    last_sent: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def behind(self, now: float) -> bool:
        return bool(self.unacked) and now - self.unacked[0][1] > MAX_LAG

    def acked(self, count: int) -> None:
        while self.unacked and self.unacked[0][0] <= count:
            self.unacked.popleft()

    async def send(self, parts: list[str]) -> None:
        async with self.lock:
            for text in pack(parts, frame_limit()):
                self.sent += 1
                self.last_sent = time.monotonic()
                self.unacked.append((self.sent, self.last_sent))
                await self.consumer.send(text_data=text)


class LiveHub:
    def __init__(self) -> None:
        self.viewers: set[Viewer] = set()
        self.pending: set[int] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def _start(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._listen(), name="live listen"),
                loop.create_task(self._render_loop(), name="live render"),
                loop.create_task(self._check_sessions(), name="live sessions"),
                loop.create_task(self._redraw_pages(), name="live pages"),
            ]

    # -- browsers -------------------------------------------------------------------------

    def join(self, consumer: AsyncWebsocketConsumer, view: MapView | ElectionView) -> Viewer:
        self._start()
        viewer = Viewer(consumer, view)
        self.viewers.add(viewer)
        self._wake.set()  # its snapshot comes with the next render
        return viewer

    def leave(self, viewer: Viewer) -> None:
        self.viewers.discard(viewer)

    def ack(self, viewer: Viewer, count: int) -> None:
        viewer.acked(count)
        if viewer.skipped and not viewer.behind(time.monotonic()):
            viewer.skipped = False
            viewer.state = None  # it missed updates: a fresh snapshot, not the backlog
            self._wake.set()

    # -- who may still watch -----------------------------------------------------------------

    async def _check_sessions(self) -> None:
        """Close the sockets of browsers whose session ended (a logout) or whose account was
        deactivated, within ``SESSION_CHECK`` seconds, on every server process."""
        while True:
            await asyncio.sleep(SESSION_CHECK)
            watching = {v: _viewer_identity(v) for v in self.viewers}
            if not watching:
                continue
            try:
                allowed = await run_db(
                    _still_allowed,
                    {s for s, _ in watching.values()},
                    {u for _, u in watching.values()},
                )
            except Exception as exc:  # the database is away: look again next time
                log.info("live map: could not check sessions: %s", exc)
                continue
            sessions, users = allowed
            for viewer, (session, user) in watching.items():
                if session not in sessions or user not in users:
                    self.leave(viewer)
                    with contextlib.suppress(Exception):
                        await viewer.consumer.close(code=CLOSE_SIGNED_OUT)

    async def _redraw_pages(self) -> None:
        """Election pages that got nothing for ``page_redraw()`` seconds are drawn afresh."""
        while True:
            await asyncio.sleep(page_redraw() / 6)
            now = time.monotonic()
            quiet = [
                v
                for v in self.viewers
                if isinstance(v.view, ElectionView) and now - v.last_sent >= page_redraw()
            ]
            for viewer in quiet:
                viewer.state = None  # drawn with the next render
            if quiet:
                self._wake.set()

    # -- the channel layer ------------------------------------------------------------------

    async def _listen(self) -> None:
        layer = get_channel_layer()
        channel = await layer.new_channel()
        guard = elections_layer.guard()
        guard.recovered.append(self.afresh)
        await guard.add(channel, FLEET_GROUP)
        while True:
            message = await elections_layer.receive(
                layer, channel, log, logging.WARNING, "live map: channel layer unavailable"
            )
            if message.get("type") == "fleet.changed":
                self.pending.update(message.get("elections", ()))
            self._wake.set()

    def afresh(self) -> None:
        """Changes may have been missed (the layer was away): everyone gets a snapshot."""
        for viewer in self.viewers:
            viewer.state = None
        self._wake.set()

    # -- rendering ------------------------------------------------------------------------

    async def _render_loop(self) -> None:
        last = -float("inf")
        while True:
            await self._wake.wait()
            self._wake.clear()
            # A change after a quiet spell is drawn at once; in a burst, at most one render
            # per coalescing window, so the burst becomes a few updates rather than many.
            wait = last + settings.ELECTORATE_LIVE_COALESCE - time.monotonic()
            if self.pending and wait > 0:
                await asyncio.sleep(wait)
            last = time.monotonic()
            changed, self.pending = self.pending, set()
            try:
                await self._render(changed)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("live map: rendering failed; browsers get a snapshot next")
                for viewer in self.viewers:
                    viewer.state = None
                await asyncio.sleep(1.0)
                self._wake.set()

    async def _render(self, changed: set[int]) -> None:
        now = time.monotonic()
        viewers = []
        for viewer in self.viewers:
            if viewer.behind(now):
                viewer.skipped = True  # no more updates until it catches up
            else:
                viewers.append(viewer)
        maps = [v for v in viewers if isinstance(v.view, MapView)]
        fresh = {v.view for v in maps if v.state is None}
        targets = {(v.view, v.state) for v in maps if v.state is not None} if changed else set()
        # Election pages: only those whose election changed, and new ones.
        pages = {
            v.view
            for v in viewers
            if isinstance(v.view, ElectionView) and (v.state is None or v.view.pk in changed)
        }
        if not fresh and not targets and not pages:
            return
        snapshots, updates, drawn = await run_db(_render, fresh, targets, changed, pages)
        sends = []
        for viewer in viewers:
            if viewer not in self.viewers:
                continue  # left meanwhile
            if isinstance(viewer.view, ElectionView):
                rendered = drawn.get(viewer.view)
            elif viewer.state is None:
                rendered = snapshots.get(viewer.view)
            else:
                rendered = updates.get((viewer.view, viewer.state))
            if rendered is None:
                continue
            viewer.state = rendered.state
            if rendered.parts:
                sends.append(viewer.send(rendered.parts))
        results = await asyncio.gather(*sends, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.info("live map: a browser went away while sending: %s", result)


def _viewer_identity(viewer: Viewer) -> tuple[str, int]:
    scope = viewer.consumer.scope
    session = scope.get("session")
    return (getattr(session, "session_key", None) or "", getattr(scope.get("user"), "pk", 0))


def _still_allowed(sessions: set[str], users: set[int]) -> tuple[set[str], set[int]]:
    """The sessions that still exist and the users still active (a query per distinct
    session, one for the users: browsers are a few dozen, not thousands)."""
    store = import_module(settings.SESSION_ENGINE).SessionStore
    alive = {key for key in sessions if key and store().exists(key)}
    active = set(
        get_user_model().objects.filter(pk__in=users, is_active=True).values_list("pk", flat=True)
    )
    return alive, active


def _render(
    fresh: set[MapView],
    targets: set[tuple[MapView, ViewState]],
    changed: set[int],
    pages: set[ElectionView],
) -> tuple[
    dict[MapView, Rendered], dict[tuple[MapView, ViewState], Rendered], dict[ElectionView, Rendered]
]:
    updates = leadermap.update(changed, targets) if targets else {}
    snapshots = {view: leadermap.snapshot(view) for view in fresh}
    drawn = {view: Rendered(electionpage.fragments(view)) for view in pages}
    return snapshots, updates, drawn


#: The hub of the running event loop (one per server process).
hub = PerLoop(LiveHub)


async def stop_hub() -> None:
    """For tests: cancel the running loop's hub."""
    found = hub.forget()
    if found is not None:
        for task in found._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
