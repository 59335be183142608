"""Embedded mode: run the periodic tasks on a thread inside the server process.

Production runs Celery beat instead (ELECTORATE_TICKER is off when REDIS_URL is set).
"""

from __future__ import annotations

import logging
import threading

from django.conf import settings
from django.db import close_old_connections

log = logging.getLogger(__name__)
_started = threading.Event()
INTERVAL = 5.0


def start_ticker() -> None:
    if not settings.ELECTORATE_TICKER or _started.is_set():
        return
    _started.set()
    threading.Thread(target=_tick, name="electorate-ticker", daemon=True).start()


def _tick() -> None:
    from elections.tasks import sweep

    stop = threading.Event()
    while not stop.wait(INTERVAL):
        try:
            sweep()
        except Exception:
            log.exception("periodic sweep failed")
        finally:
            close_old_connections()
