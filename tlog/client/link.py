"""One connection of a client to a tlogserver: an asyncio protocol around the sans-I/O
`tlog.protocol.ClientConnection`."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import cast

from tlog.protocol import BlockResponse, ClientConnection, HandshakeResponse, ProtocolError
from tlog.protocol.status import HandshakeStatus

from .errors import HandshakeError, handshake_error
from .settings import check_servers, parse_address

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


async def open_link(address: str, handshake: Callable[[], bytes], timeout: float, *,
                    max_response_size: int,
                    on_responses: Callable[[ServerLink, list[BlockResponse]], None],
                    on_lost: Callable[[ServerLink, str], None],
                    tls: ssl.SSLContext | None = None,
                    server_hostname: str | None = None) -> tuple[ServerLink, HandshakeResponse]:
    """Connect to ``address`` (TCP, or TLS checked against ``server_hostname``, default the
    address's host), send ``handshake()`` and wait for the answer, all within ``timeout``:
    the link and the accepting answer. A refusal is its `HandshakeError`; the link is
    closed on every failure."""
    loop = asyncio.get_running_loop()
    host, port = parse_address(address)
    link = ServerLink(loop, address, max_response_size, on_responses, on_lost)
    try:
        async with asyncio.timeout(timeout):
            if tls is not None:
                await loop.create_connection(lambda: link, host, port, ssl=tls,
                                             server_hostname=server_hostname or host)
            else:
                await loop.create_connection(lambda: link, host, port)
            link.write(handshake())
            response = await asyncio.shield(link.handshake)
    except BaseException:
        link.abort()
        raise
    if response.status != HandshakeStatus.OK:
        link.abort()
        raise handshake_error(response.status, address)
    if link.lost:
        raise ConnectionError(f"{address}: connection lost right after the handshake")
    return link, response


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


class Failover:
    """Which tlogserver a client uses and tries next: the list in failover order, the
    index of the one in use, the event that cuts a pause between rounds short (a new list,
    closing), and the growing pause before reconnecting after a FlushFailed."""

    def __init__(self, servers: Sequence[str], *, connect_timeout: float, delay: float,
                 max_delay: float, what: str) -> None:
        self.servers = check_servers(servers)
        self.index = 0
        self.kick = asyncio.Event()
        self.connect_timeout = connect_timeout
        self.delay, self.max_delay = delay, max_delay
        self._flush_failed_delay = delay
        self.what = what

    async def dial(self, start: int, deadline: float | None,
                   connect_once: Callable[[str, float], Awaitable[ServerLink]],
                   check_closed: Callable[[], None]) -> ServerLink:
        """`dial` from the server at ``start``; remembers which one accepted."""
        self.index, link = await dial(
            lambda: self.servers, start, deadline, connect_once,
            connect_timeout=self.connect_timeout, delay=self.delay, max_delay=self.max_delay,
            kick=self.kick, check_closed=check_closed, what=self.what)
        return link

    def change(self, servers: Sequence[str], current: str | None) -> bool:
        """Use ``servers`` from now on; whether the server in use (``current``) is no
        longer among them, and must be left."""
        self.servers = check_servers(servers)
        self.kick.set()
        if current is not None and current in self.servers:
            self.index = self.servers.index(current)
            return False
        self.index = -1  # the next round starts at the new list's first
        return current is not None

    async def pause_after_flush_failed(self) -> None:
        """Before reconnecting to a server that failed to flush: a pause doubling up to the
        largest one, until a FlushOK (`flushed`) shows that storing works again, or a kick."""
        pause = self._flush_failed_delay
        self._flush_failed_delay = min(2 * pause, self.max_delay)
        self.kick.clear()
        try:
            async with asyncio.timeout(pause):
                await self.kick.wait()
        except TimeoutError:
            pass

    def flushed(self) -> None:
        self._flush_failed_delay = self.delay
