"""The operations endpoint: ``/metrics``, ``/healthz`` and ``/readyz`` over HTTP/1.1.

A deliberately tiny server on the tlogserver's own event loop (no thread, so the
metrics collector reads the server's state without locks): one request per
connection, GET or HEAD, bounded in size and time, answered and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

#: Request line and headers together; anything larger is refused.
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 10.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error", 503: "Service Unavailable"}

ReadyCheck = Callable[[], Awaitable[tuple[bool, str]]]


class OpsServer:
    """Serves the metrics of ``registry`` and the answers of ``ready`` on ``host:port``."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 ready: ReadyCheck) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self.ready = ready
        self._server: asyncio.base_events.Server | None = None

    @property
    def sockets(self) -> list[Any]:
        return list(self._server.sockets) if self._server else []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, self.host, self.port,
                                                  limit=MAX_REQUEST_HEAD, reuse_address=True)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    await self._respond(writer, 400, "bad request\n")
                    return
                await self._route(writer, head)
        except (TimeoutError, ConnectionError):
            pass
        except Exception:  # a bug here must not take the server down
            log.exception("ops endpoint: request failed")
            with contextlib.suppress(Exception):
                await self._respond(writer, 500, "internal error\n")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _route(self, writer: asyncio.StreamWriter, head: bytes) -> None:
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            await self._respond(writer, 400, "bad request\n")
            return
        method, target = parts[0], parts[1]
        path = target.split("?", 1)[0]
        if path not in ("/metrics", "/healthz", "/readyz"):
            await self._respond(writer, 404, "not found: try /metrics, /healthz or /readyz\n")
            return
        if method not in ("GET", "HEAD"):
            await self._respond(writer, 405, "only GET and HEAD\n", head_only=False,
                                extra="Allow: GET, HEAD\r\n")
            return
        head_only = method == "HEAD"
        if path == "/metrics":
            await self._respond(writer, 200, generate_latest(self.registry),
                                content_type=CONTENT_TYPE_LATEST, head_only=head_only)
        elif path == "/healthz":
            await self._respond(writer, 200, "ok\n", head_only=head_only)
        else:
            ok, reason = await self.ready()
            await self._respond(writer, 200 if ok else 503, reason + "\n", head_only=head_only)

    @staticmethod
    async def _respond(writer: asyncio.StreamWriter, status: int, body: str | bytes, *,
                       content_type: str = "text/plain; charset=utf-8", head_only: bool = False,
                       extra: str = "") -> None:
        data = body.encode() if isinstance(body, str) else body
        header = (f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                  f"Content-Type: {content_type}\r\n"
                  f"Content-Length: {len(data)}\r\n"
                  f"Cache-Control: no-store\r\n{extra}"
                  "Connection: close\r\n\r\n").encode()
        writer.write(header if head_only else header + data)
        await writer.drain()
