"""One connection to a Redis-protocol server as an asyncio protocol: requests are written
as they are submitted, replies parsed (hiredis) as they arrive and handed to the requests in
order. No task, stream or lock per call: submitting is a plain call that returns a future,
which is what lets a storage round write to six servers and wait for them together.

Error replies come back as `hiredis.ReplyError` values in the reply list (the caller decides
what they mean); a broken connection fails every request in flight with `LinkError`.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import Any, cast

import hiredis

from .address import ServerAddress
from .resp import pack_commands

ReplyError = hiredis.ReplyError
#: Bytes of replies read after which reading pauses until the event loop's next turn: the
#: pieces of a large record come from every server at once, and libuv reads a ready socket
#: up to 32 times in a row, megabytes, before the loop runs anything else.
READ_TURN_BYTES = 1 << 20


class LinkError(Exception):
    """The connection failed or was closed; the message says why."""


class _Request:
    __slots__ = ("count", "replies", "future")

    def __init__(self, count: int, future: asyncio.Future[list[Any]]) -> None:
        self.count = count
        self.replies: list[Any] = []
        self.future = future


class RespLink(asyncio.Protocol):
    """One live connection (see the module doc). ``reason`` is set once it is unusable."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reason: str | None = None
        self._reader = hiredis.Reader()
        self._pending: deque[_Request] = deque()
        self._loop = asyncio.get_running_loop()
        self._turn_bytes = 0  # read since reading last paused for the loop's next turn

    # -- asyncio callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's are not subclasses)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._turn_bytes += len(data)
        if self._turn_bytes >= READ_TURN_BYTES:
            self._turn_bytes = 0
            self._pause_for_a_turn()
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.close(f"not a Redis reply: {exc}")
                return
            if reply is False:
                return
            if not pending:
                self.close("a reply without a request")
                return
            request = pending[0]
            request.replies.append(reply)
            if len(request.replies) == request.count:
                pending.popleft()
                if not request.future.done():
                    request.future.set_result(request.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.reason is None:
            self.reason = f"connection lost: {exc}" if exc else "connection closed by the server"
        self._fail_pending()

    def _pause_for_a_turn(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()
            self._loop.call_soon(self._read_on)

    def _read_on(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    # -- use --

    def submit(self, data: bytes | list[bytes | memoryview],
               count: int) -> asyncio.Future[list[Any]]:
        """Write ``data`` (``count`` commands; one buffer, or buffers to write one after
        the other); the future of their replies, in order."""
        future: asyncio.Future[list[Any]] = self._loop.create_future()
        if self.reason is not None or self.transport is None:
            future.set_exception(LinkError(self.reason or "not connected"))
            return future
        self._pending.append(_Request(count, future))
        if isinstance(data, bytes):
            self.transport.write(data)
        elif len(data) == 1:
            self.transport.write(data[0])
        else:
            self.transport.writelines(data)  # (uvloop writes them in one writev)
        return future

    def close(self, reason: str) -> None:
        """Close the connection; every request in flight fails with ``reason``."""
        if self.reason is None:
            self.reason = reason
        if self.transport is not None:
            self.transport.abort()
        self._fail_pending()

    def _fail_pending(self) -> None:
        while self._pending:
            future = self._pending.popleft().future
            if not future.done():
                future.set_exception(LinkError(self.reason or "connection closed"))


async def open_link(address: ServerAddress) -> RespLink:
    """Connect (TLS when the address says so), then AUTH and SELECT as it says. Raises
    OSError, ssl.SSLError or LinkError; the caller bounds the time. TLS as every Redis
    connection of tlog: `ServerAddress.ssl_context`."""
    loop = asyncio.get_running_loop()
    context = address.ssl_context() if address.tls else None
    _transport, link = await loop.create_connection(
        RespLink, address.host, address.port, ssl=context,
        server_hostname=address.host if context is not None else None)
    commands: list[tuple[Any, ...]] = []
    if address.password is not None:
        commands.append((b"AUTH", *((address.username,) if address.username else ()),
                         address.password))
    if address.db:
        commands.append((b"SELECT", address.db))
    if commands:
        try:
            replies = await link.submit(pack_commands(commands), len(commands))
        except BaseException:
            link.close("set-up interrupted")
            raise
        for reply in replies:
            if isinstance(reply, ReplyError):
                link.close(f"set-up refused: {reply}")
                raise LinkError(f"set-up refused: {reply}")
    return link
