"""One client connection: a thin `asyncio.BufferedProtocol` around the sans-I/O
`tlog.protocol.ServerConnection`. The kernel reads straight into the core's buffer, the
events go to the connection's `Vdisk` by plain calls, and all answers to one read leave in
one write (or are held a moment to go with the next ones: `tlogserver.acks`). The handshake
(vdisk id, access, version, where the log stands) is answered here."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
from time import perf_counter
from typing import Any, Protocol

from tlog.protocol.connection import (
    Block,
    ForceFlush,
    Handshake,
    ProtocolError,
    ServerConnection,
    ServerEvent,
    WaitNbdSlaveSync,
)
from tlog.protocol.status import BlockStatus, HandshakeStatus
from tlog.protocol.version import MIN_SUPPORTED_VERSION, Version
from tlog.storage import (
    StorageConfigError,
)

from .access import AccessPolicy, certificate_identities
from .acks import AckBatcher
from .config import (
    ServerConfig,
)
from .logs import ContextLogger
from .ownership import NotOwner, OwnershipUnavailable
from .stats import ServerStats
from .tasks import BackgroundTasks
from .vdisk import HandshakeResult, StoredWritesReader, Vdisk

log = logging.getLogger("tlogserver")

_VDISK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,254}$")
#: Answers a client has not read yet, per connection, before we stop reading from it (how
#: long it may leave them unread: --stalled-writer-timeout).
WRITE_BUFFER_HIGH = 4 * 1024 * 1024
#: Seconds of handling one client's reads after which reading pauses until the event loop's
#: next turn: libuv reads a ready socket up to 32 times in a row, and checking and taking
#: 8 MB of 64 KiB blocks at once would hold the loop for tens of milliseconds.
READ_TURN_SECONDS = 0.002
_ids = itertools.count(1)


class ConnectionHost(Protocol):
    """What a connection uses of the server that accepted it (`tlogserver.server.TlogServer`):
    its current config, counters and access rules, the set of open connections, and the
    vdisks."""

    config: ServerConfig
    stats: ServerStats
    access: AccessPolicy
    connections: set[TlogConnection]
    tasks: BackgroundTasks  # the handshakes and WaitNbdSlaveSync waits run here

    def note_refused(self, name: str) -> None: ...

    def stored_writes_reader(self, vdisk_id: str) -> StoredWritesReader: ...

    async def vdisk(self, vdisk_id: str) -> Vdisk: ...

    def slave_sync_unavailable(self, vdisk: Vdisk) -> str | None: ...

    def keeps_standby(self, vdisk_id: str) -> bool: ...

    async def wait_slave_sync(self, vdisk: Vdisk) -> str | None: ...


class TlogConnection(asyncio.BufferedProtocol):
    """One client connection (``tls``: accepted by the TLS listener)."""

    def __init__(self, server: ConnectionHost, tls: bool = False) -> None:
        self.server = server
        self.tls = tls
        #: Names of the client's verified certificate; None on plain TCP, () without one.
        self.identities: tuple[str, ...] | None = None
        self.stats = server.stats
        self.core = ServerConnection(server.config.max_message_size)
        self.transport: asyncio.Transport | None = None
        self.vdisk: Vdisk | None = None
        self.name = f"conn#{next(_ids)}"
        self.log = ContextLogger(log, conn=self.name)
        self.session_start = 0  # first sequence of the handshake (see vdisk.Peer)
        self._backlog: list[ServerEvent] | None = None  # events waiting for the handshake
        self._paused: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._slave_waits = 0  # WaitNbdSlaveSync requests not answered yet
        self._slave_warned = False
        self._slave_task: asyncio.Task[None] | None = None
        #: Every write to the client: the answers of small reads are held a moment.
        self.acks = AckBatcher(self._write, self, self.stats.recv_latency)
        self._turn_time = 0.0  # spent on reads since reading last paused for a turn

    # -- asyncio callbacks --
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.log.bind(peer=f"{peer[0]}:{peer[1]}")
            self.name = f"{self.name} {peer[0]}:{peer[1]}"
        if self.tls:
            # TLS already verified the certificate (if one was sent) against the client CA.
            self.identities = certificate_identities(transport.get_extra_info("peercert"))
        limit = self.server.config.max_connections
        if limit and len(self.server.connections) >= limit:
            # Refused before any byte is read: a flood of connections costs a socket each
            # for an instant, not a buffer and a handshake timer.
            self.stats.connections_refused += 1
            self.server.note_refused(self.name)
            self._closing = True
            transport.abort()
            return
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self.server.connections.add(self)
        self.stats.connections_accepted += 1
        self.log.debug("connected")
        self._timer = asyncio.get_running_loop().call_later(
            self.server.config.handshake_timeout, self._handshake_timeout)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.core.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        started = perf_counter()
        self.stats.received_bytes += nbytes
        try:
            events = self.core.buffer_updated(nbytes)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        if events:
            self._handle(events, started)
        error = self.core.error  # after the valid events of the read were handled
        if error is not None and not self._closing:
            self._protocol_error(error)
        self._turn_time += perf_counter() - started
        if self._turn_time >= READ_TURN_SECONDS:
            # Let the loop run timers and other connections before reading on.
            self._turn_time = 0.0
            self.pause("turn")
            asyncio.get_running_loop().call_soon(self.resume, "turn")

    def eof_received(self) -> bool:
        if not self.core.handshaken and self._backlog is None and not self._closing:
            # The reference answers even a client that leaves before its handshake.
            self.send(ServerConnection.send_handshake_response(HandshakeStatus.INVALID_REQUEST))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._cancel_timer()
        self.server.connections.discard(self)
        if self.vdisk is not None:
            self.vdisk.disconnect(self)
            self.log.debug("disconnected")

    def pause_writing(self) -> None:
        # The client does not read its answers: stop reading its requests, and give up on
        # it if that lasts.
        self.pause("write")
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(
            self.server.config.stalled_writer_timeout, self._drop_stalled)

    def _drop_stalled(self) -> None:
        # close() alone would wait for the unread answers to be written, which never
        # happens: the connection and its buffers would stay until the client leaves.
        self.close("client stopped reading its responses")
        if self.transport is not None:
            self.transport.abort()

    def resume_writing(self) -> None:
        self._cancel_timer()
        self.resume("write")

    # -- what the vdisk and the server call --
    def send(self, data: bytes) -> None:
        """Write ``data`` now, after any held answers (their order is kept)."""
        self.acks.send(data)

    def close(self, reason: str) -> None:
        if self._closing or self.transport is None:
            return
        self.acks.release()
        self.log.info("closing: %s", reason)
        self._closing = True
        self._cancel_timer()
        self.transport.close()

    def pause(self, reason: str) -> None:
        """Stop reading from the client until every ``reason`` given is resumed."""
        if not self._paused and self.transport is not None and not self._closing:
            self.transport.pause_reading()
        self._paused.add(reason)

    def resume(self, reason: str) -> None:
        """Take back ``pause(reason)``; reading goes on once no reason is left."""
        self._paused.discard(reason)
        if not self._paused and self.transport is not None and not self._closing:
            self.transport.resume_reading()

    # -- internals --
    def _handle(self, events: list[ServerEvent], started: float = 0.0) -> None:
        """Feed ``events`` to the vdisk and write all answers at once.

        ``started`` (perf_counter at the read) times the read's answers; counters are
        added once per call, not per block.
        """
        if self._backlog is not None:
            self._backlog.extend(events)
            return
        vdisk = self.vdisk
        out: list[bytes] = []
        blocks = len(events)  # minus the other messages, below
        flush_asked = False  # the client waits for an answer: its reads are not paused
        for i, event in enumerate(events):
            if type(event) is Block:
                if vdisk is None:
                    raise AssertionError("block before handshake")
                vdisk.receive(event, out, self)
            elif isinstance(event, Handshake):
                blocks -= len(events) - i  # the rest is handled after the handshake
                self._backlog = list(events[i + 1:])
                self.pause("handshake")
                self.server.tasks.start(self._handshake(event), f"handshake of {self.name}")
                break
            elif isinstance(event, ForceFlush):
                assert vdisk is not None
                blocks -= 1
                flush_asked = True
                out.append(ServerConnection.send_response(BlockStatus.FORCE_FLUSH_RECEIVED))
                vdisk.force_flush(event.sequence)
            elif isinstance(event, WaitNbdSlaveSync):
                assert vdisk is not None
                blocks -= 1
                flush_asked = True
                failure = self.server.slave_sync_unavailable(vdisk)
                if failure is not None:  # answered at once: nothing to wait for
                    if not self._slave_warned:  # once per connection: it may send floods
                        self._slave_warned = True
                        self.log.warning("WaitNbdSlaveSync failed: %s", failure)
                    out.append(ServerConnection.send_response(
                        BlockStatus.WAIT_NBD_SLAVE_SYNC_FAILED))
                else:
                    self._slave_waits += 1
                    if self._slave_task is None:
                        self._slave_task = self.server.tasks.start(
                            self._wait_slave_sync(vdisk), f"WaitNbdSlaveSync of {self.name}")
        self.stats.received_blocks += blocks
        self.acks.read(len(events), flush_asked)
        if out:
            self.acks.answer(b"".join(out), blocks, started, self.server.config.ack_delay)

    def _write(self, data: bytes) -> None:
        """To the client, now (`acks` calls it; nothing once the connection closes)."""
        if not self._closing and self.transport is not None:
            self.transport.write(data)

    async def _wait_slave_sync(self, vdisk: Vdisk) -> None:
        """Answer WaitNbdSlaveSync once the standby holds every flushed block (or fail).
        Requests that arrive while one waits are answered by the next round, together:
        a flood of them costs one wait, not a task each."""
        try:
            while self._slave_waits and not self._closing:
                count, self._slave_waits = self._slave_waits, 0
                self.log.info("WaitNbdSlaveSync: waiting for the standby")
                try:
                    failure = await self.server.wait_slave_sync(vdisk)
                except Exception as exc:  # a bug must not go unanswered
                    self.log.exception("WaitNbdSlaveSync failed")
                    failure = f"internal error: {exc}"
                if failure is None:
                    self.log.info("WaitNbdSlaveSync: the standby holds every flushed block")
                    status = BlockStatus.WAIT_NBD_SLAVE_SYNC_RECEIVED
                else:
                    self.log.warning("WaitNbdSlaveSync failed: %s", failure)
                    status = BlockStatus.WAIT_NBD_SLAVE_SYNC_FAILED
                if not self._closing:
                    self.send(ServerConnection.send_response(status) * count)
        finally:
            self._slave_task = None

    async def _handshake(self, request: Handshake) -> None:
        result = await self._accept(request)
        status = result.status
        self.send(ServerConnection.send_handshake_response(
            status, last_sequence=result.last_sequence, has_log=result.has_log,
            epoch=result.epoch,
            slave_sync=self.vdisk is not None and self.server.keeps_standby(self.vdisk.id),
            range_ops=request.range_ops and self.vdisk is not None
            and self.vdisk.takes_ranges))
        if status != HandshakeStatus.OK:
            if self._backlog is not None:
                self._backlog.clear()  # what it sent after the handshake is never looked at
            self.stats.handshake_refused(status.name.lower())
            self.close(f"handshake refused: {status.name}")
            return
        self._cancel_timer()
        backlog, self._backlog = self._backlog or [], None
        self.resume("handshake")
        if backlog and not self._closing:
            self._handle(backlog)

    async def _accept(self, request: Handshake) -> HandshakeResult:
        version = Version.from_uint32(request.version)
        if version < MIN_SUPPORTED_VERSION:
            self.log.warning("client version %s is older than %s", version,
                             MIN_SUPPORTED_VERSION)
            return HandshakeResult(HandshakeStatus.INVALID_VERSION)
        if not _VDISK_ID.match(request.vdisk_id):
            self.log.warning("invalid vdisk id %r", request.vdisk_id[:80])
            return HandshakeResult(HandshakeStatus.INVALID_VDISK_ID)
        context = {"vdisk": request.vdisk_id}
        # Before the vdisk is opened: a refused client costs no storage read and leaves
        # nothing behind (no vdisk, no chain state, no metrics series).
        decision = self.server.access.check(request.vdisk_id, request.token, self.identities)
        if not decision.allowed:
            self.log.warning("handshake refused, unauthorized: %s", decision.reason,
                             extra=context)
            return HandshakeResult(HandshakeStatus.UNAUTHORIZED)
        while True:
            try:
                vdisk = await self.server.vdisk(request.vdisk_id)
            except StorageConfigError as exc:
                self.log.warning("vdisk refused: %s", exc, extra=context)
                return HandshakeResult(HandshakeStatus.INVALID_VDISK_ID)
            except NotOwner as exc:
                self.log.info("handshake refused: %s", exc, extra=context)
                return HandshakeResult(HandshakeStatus.NOT_OWNER)
            except OwnershipUnavailable as exc:  # etcd out of reach: logged once, by Ownership
                self.log.debug("handshake refused: %s", exc, extra=context)
                return HandshakeResult(HandshakeStatus.INTERNAL_SERVER_ERROR)
            except Exception as exc:  # storage down, unreadable chain: the client retries
                self.log.error("cannot open the vdisk: %s", exc, extra=context)
                return HandshakeResult(HandshakeStatus.INTERNAL_SERVER_ERROR)
            if self._closing:
                return HandshakeResult(HandshakeStatus.INTERNAL_SERVER_ERROR)
            if not vdisk.retired:  # else it went idle while we waited: open it again
                break
        self.log.bind(vdisk=vdisk.id)
        result = vdisk.handshake(self, request.first_sequence, request.reset_first_sequence,
                                 request.continue_sequence)
        if result.status != HandshakeStatus.OK:
            return result
        self.vdisk = vdisk
        self.log.info("handshake: vdisk %s, first sequence %s%s, epoch %d (%s%s)", vdisk.id,
                      "continued at " + str(vdisk.expected) if request.continue_sequence
                      else request.first_sequence,
                      " (reset)" if request.reset_first_sequence else "", vdisk.epoch,
                      decision.how, ", TLS" if self.tls else "")
        if result.check_from is not None:
            # The client resends sequences stored already: learn what they wrote first, so
            # that a new write under a reused sequence is not mistaken for a resend.
            try:
                await vdisk.load_writes(result.check_from, self.server.stored_writes_reader(
                    vdisk.id))
            except Exception as exc:
                self.log.error("cannot read back the stored blocks from sequence %d: %s",
                               result.check_from, exc)
                vdisk.disconnect(self)
                self.vdisk = None
                return HandshakeResult(HandshakeStatus.INTERNAL_SERVER_ERROR)
        return result

    def _protocol_error(self, exc: ProtocolError) -> None:
        self.log.warning("protocol error, closing: %s", exc)
        if not self.core.handshaken and self._backlog is None:
            self.send(ServerConnection.send_handshake_response(HandshakeStatus.INVALID_REQUEST))
        self.close(f"protocol error: {exc}")

    def _handshake_timeout(self) -> None:
        self._timer = None
        if self.vdisk is None:
            self.close("no handshake within the timeout")

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
