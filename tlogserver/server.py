"""The asyncio server: accepts connections and moves bytes between them and the core.

`TlogConnection` is a thin `asyncio.BufferedProtocol`: the kernel reads straight
into the sans-I/O `ServerConnection`'s buffer, the events go to the connection's
`Vdisk` by plain calls, and all answers to one read leave in one write.
`TlogServer` owns the listener, the vdisks and the storage pools, and drains on
SIGTERM/SIGINT: stop accepting, flush every vdisk, answer, close, exit.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import signal
from typing import Any

from tlog.aggregation import Keyring, LegacyWriter, RecordOpener, V2Writer
from tlog.crypto import LegacyCipher
from tlog.decoder import DecodeError, find_last
from tlog.protocol import (
    Block,
    ForceFlush,
    Handshake,
    ProtocolError,
    ServerConnection,
    ServerEvent,
    WaitNbdSlaveSync,
)
from tlog.status import BlockStatus, HandshakeStatus
from tlog.storage import StorageConfigError, StoragePoolFactory, any_pool_factory
from tlog.version import MIN_SUPPORTED_VERSION, Version

from .config import ServerConfig
from .flusher import Flusher
from .vdisk import Vdisk

log = logging.getLogger("tlogserver")

_VDISK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,254}$")
#: Answers a client has not read yet, per connection, before we stop reading from it.
WRITE_BUFFER_HIGH = 4 * 1024 * 1024
#: How long a client may leave that buffer full before it is disconnected.
STALLED_WRITER_TIMEOUT = 30.0
_ids = itertools.count(1)


class TlogConnection(asyncio.BufferedProtocol):
    """One client connection."""

    def __init__(self, server: TlogServer) -> None:
        self.server = server
        self.core = ServerConnection(server.config.max_message_size)
        self.transport: asyncio.Transport | None = None
        self.vdisk: Vdisk | None = None
        self.name = f"conn#{next(_ids)}"
        self._backlog: list[ServerEvent] | None = None  # events waiting for the handshake
        self._paused: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False

    # -- asyncio callbacks --
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.name = f"{self.name} {peer[0]}:{peer[1]}"
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self.server.connections.add(self)
        self._timer = asyncio.get_running_loop().call_later(
            self.server.config.handshake_timeout, self._handshake_timeout)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.core.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            events = self.core.buffer_updated(nbytes)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        self._handle(events)
        if self.core.errored and not self._closing:
            try:
                self.core.buffer_updated(0)
            except ProtocolError as exc:
                self._protocol_error(exc)

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
            log.debug("%s: disconnected from vdisk %s", self.name, self.vdisk.id)

    def pause_writing(self) -> None:
        # The client does not read its answers: stop reading its requests, and give up on
        # it if that lasts.
        self._pause("write")
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(
            STALLED_WRITER_TIMEOUT, self.close, "client stopped reading its responses")

    def resume_writing(self) -> None:
        self._cancel_timer()
        self._resume("write")

    # -- what the vdisk calls --
    def send(self, data: bytes) -> None:
        if not self._closing and self.transport is not None:
            self.transport.write(data)

    def close(self, reason: str) -> None:
        if self._closing or self.transport is None:
            return
        log.info("%s: closing: %s", self.name, reason)
        self._closing = True
        self._cancel_timer()
        self.transport.close()

    # -- internals --
    def _handle(self, events: list[ServerEvent]) -> None:
        if self._backlog is not None:
            self._backlog.extend(events)
            return
        vdisk = self.vdisk
        out: list[bytes] = []
        for i, event in enumerate(events):
            if type(event) is Block:
                if vdisk is None:
                    raise AssertionError("block before handshake")
                vdisk.receive(event, out)
            elif isinstance(event, Handshake):
                self._backlog = list(events[i + 1:])
                self._pause("handshake")
                asyncio.get_running_loop().create_task(self._handshake(event))
                break
            elif isinstance(event, ForceFlush):
                assert vdisk is not None
                out.append(ServerConnection.send_response(BlockStatus.FORCE_FLUSH_RECEIVED))
                vdisk.force_flush(event.sequence)
            elif isinstance(event, WaitNbdSlaveSync):
                # No slave sync exists yet: nothing to wait for.
                out.append(ServerConnection.send_response(
                    BlockStatus.WAIT_NBD_SLAVE_SYNC_RECEIVED))
        if out:
            self.send(b"".join(out))

    async def _handshake(self, request: Handshake) -> None:
        status = await self._accept(request)
        self.send(ServerConnection.send_handshake_response(status))
        if status != HandshakeStatus.OK:
            self.close(f"handshake refused: {status.name}")
            return
        self._cancel_timer()
        backlog, self._backlog = self._backlog or [], None
        self._resume("handshake")
        if backlog and not self._closing:
            self._handle(backlog)

    async def _accept(self, request: Handshake) -> HandshakeStatus:
        version = Version.from_uint32(request.version)
        if version < MIN_SUPPORTED_VERSION:
            log.warning("%s: client version %s is older than %s", self.name, version,
                        MIN_SUPPORTED_VERSION)
            return HandshakeStatus.INVALID_VERSION
        if not _VDISK_ID.match(request.vdisk_id):
            log.warning("%s: invalid vdisk id %r", self.name, request.vdisk_id[:80])
            return HandshakeStatus.INVALID_VDISK_ID
        while True:
            try:
                vdisk = await self.server.vdisk(request.vdisk_id)
            except StorageConfigError as exc:
                log.warning("%s: vdisk %s refused: %s", self.name, request.vdisk_id, exc)
                return HandshakeStatus.INVALID_VDISK_ID
            except Exception as exc:  # storage down, unreadable chain: the client retries
                log.error("%s: cannot open vdisk %s: %s", self.name, request.vdisk_id, exc)
                return HandshakeStatus.INTERNAL_SERVER_ERROR
            if self._closing:
                return HandshakeStatus.INTERNAL_SERVER_ERROR
            if not vdisk.retired:  # else it went idle while we waited: open it again
                break
        status = vdisk.handshake(self, request.first_sequence, request.reset_first_sequence)
        if status == HandshakeStatus.OK:
            self.vdisk = vdisk
            log.info("%s: vdisk %s, first sequence %d%s", self.name, vdisk.id,
                     request.first_sequence, " (reset)" if request.reset_first_sequence else "")
        return status

    def _protocol_error(self, exc: ProtocolError) -> None:
        log.warning("%s: protocol error, closing: %s", self.name, exc)
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

    def _pause(self, reason: str) -> None:
        if not self._paused and self.transport is not None and not self._closing:
            self.transport.pause_reading()
        self._paused.add(reason)

    def _resume(self, reason: str) -> None:
        self._paused.discard(reason)
        if not self._paused and self.transport is not None and not self._closing:
            self.transport.resume_reading()


class TlogServer:
    """Listener, vdisks and storage of one tlogserver process."""

    def __init__(self, config: ServerConfig, factory: StoragePoolFactory | None = None) -> None:
        self.config = config
        self.factory = factory or any_pool_factory(
            k=config.k, m=config.m,
            addresses=",".join(config.storage_addresses) or None,
            config_path=config.config if config.storage is not None else None,
            allow_memory=True)
        self.vdisks: dict[str, Vdisk] = {}
        self._opening: dict[str, asyncio.Future[Vdisk]] = {}
        self.connections: set[TlogConnection] = set()
        self._server: asyncio.base_events.Server | None = None
        self._stopping = asyncio.Event()
        assert config.master_key is not None
        legacy = (LegacyCipher(config.master_key, config.legacy_nonce)
                  if config.legacy_nonce is not None else None)
        self.opener = RecordOpener(Keyring.of(config.master_key), legacy,
                                   "legacy" if legacy is not None else "v2")

    @property
    def sockets(self) -> list[Any]:
        return list(self._server.sockets) if self._server else []

    async def start(self) -> None:
        cfg = self.config
        if self.factory.is_memory:
            log.warning("storage: in-memory (embedded default): data will NOT survive a restart")
        else:
            log.info("storage: %s", self.factory.describe())
        if cfg.ephemeral_key:
            log.warning("no master key given: using a random key for this run only")
        if cfg.storage_format == "legacy":
            log.warning("storage format legacy: every aggregation is encrypted with the SAME "
                        "AES-GCM nonce (0-Disk's layout); use it only for compatibility")
        self._server = await asyncio.get_running_loop().create_server(
            lambda: TlogConnection(self), cfg.host, cfg.port, reuse_address=True, backlog=1024)
        for sock in self._server.sockets:
            host, port = sock.getsockname()[:2]
            log.info("listening on %s:%d (flush-size %d, flush-time %gs, k=%d, m=%d, format %s)",
                     host, port, cfg.flush_size, cfg.flush_time, cfg.k, cfg.m, cfg.storage_format)

    async def vdisk(self, vdisk_id: str) -> Vdisk:
        """The vdisk, created on first use with its chain continued from storage."""
        found = self.vdisks.get(vdisk_id)
        if found is not None and not found.retired:
            return found
        opening = self._opening.get(vdisk_id)
        if opening is not None:
            return await asyncio.shield(opening)
        future: asyncio.Future[Vdisk] = asyncio.get_running_loop().create_future()
        self._opening[vdisk_id] = future
        try:
            vdisk = await self._open(vdisk_id)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters get it through await
            raise
        else:
            future.set_result(vdisk)
            self.vdisks[vdisk_id] = vdisk
            return vdisk
        finally:
            del self._opening[vdisk_id]

    async def _open(self, vdisk_id: str) -> Vdisk:
        cfg = self.config
        pool = self.factory.pool_for(vdisk_id)
        try:
            last = await find_last(pool, vdisk_id, self.opener)
        except DecodeError as exc:
            raise RuntimeError(f"cannot continue the chain: {exc}") from None
        prev = last.hash if last is not None else bytes(32)
        if last is not None:
            log.info("vdisk %s: continuing the chain after %s (last sequence %d)", vdisk_id,
                     last.hash.hex()[:16], last.last_sequence)
        assert cfg.master_key is not None
        writer: V2Writer | LegacyWriter
        if cfg.storage_format == "legacy":
            assert cfg.legacy_nonce is not None
            writer = LegacyWriter(cfg.master_key, cfg.legacy_nonce, vdisk_id)
        else:
            writer = V2Writer(cfg.master_key, vdisk_id)
        holder: list[Vdisk] = []
        flusher = Flusher(vdisk_id, pool, writer, prev,
                          on_stored=lambda batches: holder[0].on_stored(batches),
                          on_failed=lambda batches, exc: holder[0].on_failed(batches, exc))
        vdisk = Vdisk(vdisk_id, cfg, flusher, self._retire)
        holder.append(vdisk)
        flusher.start()
        return vdisk

    def _retire(self, vdisk: Vdisk) -> None:
        if self.vdisks.get(vdisk.id) is vdisk:
            del self.vdisks[vdisk.id]
        asyncio.get_running_loop().create_task(vdisk.flusher.stop())
        log.debug("vdisk %s: idle, released", vdisk.id)

    async def serve_forever(self) -> None:
        await self._stopping.wait()

    def request_stop(self) -> None:
        self._stopping.set()

    async def shutdown(self) -> bool:
        """Stop accepting, flush every vdisk, close connections. True if all was stored."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn._pause("drain")
        vdisks = list(self.vdisks.values())
        clean = True
        if vdisks:
            log.info("draining %d vdisk(s)", len(vdisks))
            try:
                await asyncio.wait_for(asyncio.gather(*(v.drain() for v in vdisks)),
                                       self.config.drain_timeout)
            except TimeoutError:
                clean = False
                log.error("drain timed out after %gs: some blocks were not stored (clients "
                          "still hold them and resend)", self.config.drain_timeout)
        for conn in list(self.connections):
            conn.close("server shutting down")
        for vdisk in vdisks:
            await vdisk.flusher.stop()
        if self._server is not None:
            await self._server.wait_closed()
        await self.factory.close()
        return clean


async def run(config: ServerConfig, ready: asyncio.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT, then drain; returns the exit code."""
    server = TlogServer(config)
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(signame: str) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("%s received: draining (send it again to exit at once)", signame)
            server.request_stop()
        else:
            log.warning("second %s: exiting without waiting", signame)
            raise SystemExit(1)

    # Handlers first: a signal that arrives as soon as "listening" is logged must drain too.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    await server.start()
    if ready is not None:
        ready.set()
    await server.serve_forever()
    clean = await server.shutdown()
    log.info("stopped%s", "" if clean else " (drain incomplete)")
    return 0 if clean else 1
