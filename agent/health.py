"""Health and metrics HTTP endpoints for load balancers and Prometheus.

``GET /health/leadership/<election>``: 200 when this agent leads it, 503 otherwise (like
Patroni's ``/leader``); ``GET /health``: JSON of every election; ``GET /metrics``.
A plain asyncio server: three read-only routes do not justify a web framework in the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from agent.metrics import CONTENT_TYPE

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


@dataclass(eq=False)
class HealthServer:
    host: str
    port: int
    _: KW_ONLY
    status: Callable[[], dict[str, Any]]
    is_leader: Callable[[str], bool | None]
    metrics: Callable[[], bytes]
    _server: asyncio.Server | None = field(default=None, init=False)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)

    def route(self, method: str, target: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET\n"
        path = unquote(urlsplit(target).path)
        if path in ("/health", "/health/"):
            return 200, "application/json", json.dumps(self.status(), default=str).encode()
        if path.startswith("/health/leadership/"):
            election = path.removeprefix("/health/leadership/").strip("/")
            leading = self.is_leader(election)
            if leading is None:
                return 404, "text/plain", f"no election {election!r} on this agent\n".encode()
            if leading:
                return 200, "text/plain", b"leader\n"
            return 503, "text/plain", b"not leader\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE, self.metrics()
        return 404, "text/plain", b"not found\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request_line = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            parts = request_line.decode("latin-1").split()
            if len(parts) != 3:
                status, ctype, body = 400, "text/plain", b"bad request\n"
            else:
                status, ctype, body = self.route(parts[0], parts[1])
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + (b"" if parts[:1] == ["HEAD"] else body))
            await writer.drain()
        except (TimeoutError, OSError, ValueError):
            pass
        finally:
            writer.close()
