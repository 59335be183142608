"""Embedded mode: run the periodic tasks on a thread inside the server process.

Production runs Celery beat instead (ELECTORATE_TICKER is off when REDIS_URL is set).
"""

from __future__ import annotations

import logging
import threading
import time

from django.conf import settings
from django.db import close_old_connections

log = logging.getLogger(__name__)
_started = threading.Event()


def start_ticker() -> None:
    if not settings.ELECTORATE_TICKER or _started.is_set():
        return
    _started.set()
    threading.Thread(target=_tick, name="electorate-ticker", daemon=True).start()


def _tick() -> None:
    from elections.tasks import PERIODIC

    due = {task.name: 0.0 for task, _ in PERIODIC}
    while True:
        time.sleep(0.5)
        now = time.monotonic()
        for task, seconds in PERIODIC:
            if now < due[task.name]:
                continue
            due[task.name] = now + seconds
            try:
                task()
            except Exception:
                log.exception("periodic task %s failed", task.name)
            finally:
                close_old_connections()
