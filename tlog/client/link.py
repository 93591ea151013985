"""One connection of a client to a tlogserver: an asyncio protocol around the sans-I/O
`tlog.protocol.ClientConnection`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import cast

from tlog.protocol import BlockResponse, ClientConnection, HandshakeResponse, ProtocolError

from .errors import HandshakeError

log = logging.getLogger("tlog.client")


class ServerLink(asyncio.Protocol):
    """One TCP connection to a tlogserver: its handshake answer as a future, the block
    responses and the loss of the connection handed to the client's callbacks."""

    def __init__(self, loop: asyncio.AbstractEventLoop, address: str, max_response_size: int,
                 on_responses: Callable[[ServerLink, list[BlockResponse]], None],
                 on_lost: Callable[[ServerLink, str], None]) -> None:
        self.address = address
        self.loop = loop
        self._on_responses = on_responses
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.core = ClientConnection(max_response_size)
        self.handshake: asyncio.Future[HandshakeResponse] = self.loop.create_future()
        self.lost = False
        self.last_rx = self.loop.time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        try:
            if sock is not None and sock.getsockname() == sock.getpeername():
                # Connecting to a port nobody listens on may hand us that port as our
                # own source port: TCP then connects the socket to itself.
                self._fail_handshake(ConnectionRefusedError(f"{self.address}: self-connection"))
                self.abort()
        except OSError:
            pass

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.loop.time()
        try:
            responses = self.core.receive_data(data)
        except ProtocolError as exc:
            log.warning("%s: protocol error: %s", self.address, exc)
            self._fail_handshake(exc)
            self._on_lost(self, f"protocol error: {exc}")
            return
        if responses and isinstance(responses[0], HandshakeResponse):
            if not self.handshake.done():
                self.handshake.set_result(responses[0])
            del responses[0]
        if responses:
            # only a connection's first event is a HandshakeResponse, removed above
            self._on_responses(self, cast(list[BlockResponse], responses))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail_handshake(ConnectionError(
            f"{self.address}: connection closed during the handshake"
            + (f": {exc}" if exc else "")))
        self._on_lost(self, f"connection lost: {exc}" if exc else "connection closed")

    def _fail_handshake(self, exc: BaseException) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(exc)
            self.handshake.exception()  # mark retrieved: nobody may be waiting any more

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    def writelines(self, frames: list[bytes]) -> None:
        if self.transport is not None and not self.lost:
            self.transport.writelines(frames)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def dial(servers: Callable[[], list[str]], start: int, deadline: float | None,
               connect_once: Callable[[str, float], Awaitable[ServerLink]], *,
               connect_timeout: float, delay: float, max_delay: float, kick: asyncio.Event,
               check_closed: Callable[[], None], what: str) -> tuple[int, ServerLink]:
    """Try the servers in list order from ``start``, round after round with a pause doubling
    from ``delay`` to ``max_delay`` (cut short by ``kick``), until one accepts: its index and
    link. Raises the first permanent refusal once every server refused for good, and
    `ConnectionError` when ``deadline`` (loop time) passes.
    """
    loop = asyncio.get_running_loop()
    last: BaseException | None = None
    quiet = False  # after a first round, failures are logged at debug level
    while True:
        addresses = list(servers())
        permanent: list[HandshakeError] = []
        for i in range(len(addresses)):
            check_closed()
            index = (start + i) % len(addresses)
            address = addresses[index]
            timeout = connect_timeout
            if deadline is not None:
                timeout = min(timeout, max(0.001, deadline - loop.time()))
            try:
                link = await connect_once(address, timeout)
            except HandshakeError as exc:
                last = exc
                if exc.permanent:
                    permanent.append(exc)
                log.log(logging.DEBUG if quiet else logging.WARNING, "%s", exc)
                continue
            except (OSError, TimeoutError, ProtocolError) as exc:
                if not (isinstance(exc, TimeoutError) and last is not None):
                    last = exc  # a timeout (often the deadline's) says less than the rest
                log.log(logging.DEBUG if quiet else logging.WARNING,
                        "cannot connect to tlogserver %s: %s", address, exc or type(exc))
                continue
            return index, link
        quiet = True
        if len(permanent) == len(addresses):
            raise permanent[0]
        now = loop.time()
        if deadline is not None and now >= deadline:
            raise ConnectionError(f"no tlogserver of {addresses} accepted {what}: {last}"
                                  ) from last
        pause = delay if deadline is None else min(delay, deadline - now)
        delay = min(delay * 2, max_delay)
        kick.clear()
        try:  # (asyncio.timeout: 3.11's wait_for may swallow a cancellation)
            async with asyncio.timeout(pause):
                await kick.wait()
        except TimeoutError:
            pass
