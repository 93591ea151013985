"""`TlogClient`, the asyncio tlog client: log a vdisk's writes to a tlogserver, never losing
one.

`TlogClient` is the asyncio client an NBD server puts in front of every write;
`ThreadedClient` runs one in a background thread for synchronous callers.

What the client promises (see docs/client.md for the why):

- Every block handed to `TlogClient.send` is kept, as its encoded frame, until
  the server answers ``FlushOK`` for its sequence. Nothing else removes it.
- A block without ``RecvOK`` after ``resend_timeout`` is sent again, found by
  one periodic check (not a timer per block).
- When the connection is lost, or the server reports ``FlushFailed``, the
  client reconnects with capped exponential backoff, moving to the next server
  of its list, handshakes with ``firstSequence`` = its lowest unflushed sequence
  and resends every unflushed block in sequence order.
- The unflushed buffer is bounded in bytes: a full buffer makes `send` wait,
  which is the only backpressure an NBD server sees.

The wire is spoken by the sans-I/O `tlog.protocol.ClientConnection`, whose
fast paths (one copy of the data per block message, responses in the usual
layout decoded with a few byte comparisons) were written for this client;
writes are batched per event-loop iteration.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

from tlog.protocol import BlockResponse, ClientConnection, HandshakeResponse, wire
from tlog.protocol.ranges import range_data
from tlog.protocol.status import BlockStatus, Operation

from .buffer import UnflushedBuffer
from .errors import ClientClosedError, HandshakeError, SlaveSyncError
from .link import Failover, ServerLink, open_link
from .stats import ClientStats, ResponseCallback, ResponseFanout, ResponseStream
from .waiters import Waiters

log = logging.getLogger("tlog.client")

#: Seconds without RecvOK after which a block is sent again (the reference's value).
DEFAULT_RESEND_TIMEOUT = 2.0
#: Bytes of encoded, unflushed blocks kept before `send` waits.
DEFAULT_MAX_UNFLUSHED_BYTES = 32 * 1024 * 1024
#: First and largest pause between two rounds of connection attempts.
DEFAULT_RECONNECT_DELAY = 0.05
DEFAULT_RECONNECT_MAX_DELAY = 1.0
#: Seconds one attempt (TCP connect + handshake) may take.
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Largest server message accepted. Responses are small, but a force flush of a
#: long ordered run is one FlushOK listing every sequence of it.
DEFAULT_MAX_RESPONSE_SIZE = 16 * 1024 * 1024
#: Bytes queued by `send` before they are written and the loop gets a turn.
WRITE_BATCH = 256 * 1024

HASH_SIZE = 32
BLOCK_MESSAGE_OVERHEAD = wire.BLOCK_MESSAGE_OVERHEAD

# The answers, as the plain ints the response decoder gives (compared once per response).
RECV_OK, FLUSH_OK = int(BlockStatus.RECV_OK), int(BlockStatus.FLUSH_OK)
RECV_FAILED, FLUSH_FAILED = int(BlockStatus.RECV_FAILED), int(BlockStatus.FLUSH_FAILED)
SLAVE_SYNC_OK = int(BlockStatus.WAIT_NBD_SLAVE_SYNC_RECEIVED)
SLAVE_SYNC_FAILED = int(BlockStatus.WAIT_NBD_SLAVE_SYNC_FAILED)


# -- encoding --------------------------------------------------------------------------

def encode_block(sequence: int, index: int, timestamp: int, data: bytes | memoryview,
                 operation: int = Operation.SET, hash: bytes | None = None) -> bytes:
    """The bytes of one TlogBlock message (the protocol core's encoder)."""
    return ClientConnection.send_block(sequence, index, timestamp, data, operation, hash)


class TlogClient:
    """Logs one vdisk's blocks to a list of tlogservers (asyncio; one event loop).

    ``servers`` are ``host:port`` addresses in failover order. Sequences must
    be sent in increasing order (the server orders blocks by sequence and
    reconnects handshake from the lowest unflushed one). ``on_response`` is
    called in the loop with every server response ``(status, sequences)``;
    it must be quick; what it raises is logged, not propagated.

    ``tls`` (an `ssl.SSLContext`, see `client_tls_context`) makes every connection
    TLS, checked against ``server_hostname`` (default: each address's host).
    ``token`` is the vdisk's access token, sent in every handshake, for servers that
    require one; a server that refuses it answers Unauthorized (`UnauthorizedError`).

    ``first_sequence=None`` continues the vdisk's log: the first handshake asks the server
    where it ends, and `first_sequence` / `next_sequence` say where this client starts
    (0 on a vdisk without a log). A client that starts again at a sequence the log already
    holds, without ``reset_first_sequence``, gets a new epoch from our server as soon as
    one of its writes differs (docs/durability.md). ``first_sequence=None`` with
    ``reset_first_sequence`` starts a new epoch right after the log's last sequence: the
    server closes every other connection of the vdisk and drops what they sent but it has
    not taken in order (what a restarted NBD server needs, whose earlier run may still have
    blocks in flight); `epoch` is then the new epoch.
    """

    def __init__(self, servers: Sequence[str], vdisk_id: str, first_sequence: int | None = 0, *,
                 reset_first_sequence: bool = False,
                 resend_timeout: float = DEFAULT_RESEND_TIMEOUT,
                 max_unflushed_bytes: int = DEFAULT_MAX_UNFLUSHED_BYTES,
                 reconnect_delay: float = DEFAULT_RECONNECT_DELAY,
                 reconnect_max_delay: float = DEFAULT_RECONNECT_MAX_DELAY,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 stall_timeout: float | None = None,
                 reconnect_on_flush_failed: bool = True,
                 on_response: ResponseCallback | None = None,
                 max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
                 version: int | None = None,
                 range_ops: bool = False,
                 tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None,
                 token: bytes | str | None = None) -> None:
        if resend_timeout <= 0 or max_unflushed_bytes <= 0 or connect_timeout <= 0:
            raise ValueError("timeouts and max_unflushed_bytes must be > 0")
        if not 0 < reconnect_delay <= reconnect_max_delay:
            raise ValueError("need 0 < reconnect_delay <= reconnect_max_delay")
        self._failover = Failover(servers, connect_timeout=connect_timeout,
                                  delay=reconnect_delay, max_delay=reconnect_max_delay,
                                  what=f"vdisk {vdisk_id}")
        self.vdisk_id = vdisk_id
        #: None until the first handshake when the client continues the vdisk's log
        #: (``first_sequence=None``); then the sequence it continues at.
        self.first_sequence = first_sequence
        self._continue = first_sequence is None
        if first_sequence is None:
            first_sequence = 0
        #: The first server's answer to the handshake: where the vdisk's log stood
        #: (`HandshakeResponse.last_sequence`, ``has_log``) and the epoch this client's
        #: blocks go to (``epoch``); None before.
        self.log_position: HandshakeResponse | None = None
        #: The epoch the server puts this client's blocks in, from the latest handshake.
        self.epoch = 0
        self.reset_first_sequence = reset_first_sequence
        self.resend_timeout = resend_timeout
        self.max_unflushed_bytes = max_unflushed_bytes
        #: No byte from the server for this long while blocks wait for RecvOK: reconnect.
        self.stall_timeout = 5 * resend_timeout if stall_timeout is None else stall_timeout
        self.reconnect_on_flush_failed = reconnect_on_flush_failed
        self.max_response_size = max_response_size
        self.version = version
        #: Ask every server whether it takes range operations (`delete_range`); whether the
        #: one connected to does (False until a handshake says so).
        self.ask_range_ops = range_ops
        self.range_ops = False
        self._ranges: set[int] = set()  # unflushed range operations' sequences
        #: TLS for every connection (see `client_tls_context`); None: plain TCP.
        self.tls = tls
        #: The name the server certificates must carry; default: the host of each address.
        self.server_hostname = server_hostname
        # The vdisk's access token, sent in every handshake; private so that no repr shows it.
        self._token = token.encode() if isinstance(token, str) else token
        self._answers = ResponseFanout(on_response, f"vdisk {vdisk_id}")
        self._release_hooks: list[Callable[[], None]] = []

        self._loop = asyncio.get_running_loop()
        self._buf = UnflushedBuffer(first_sequence)  # until FlushOK; the only copy of the data
        self._next = first_sequence  # highest sequence sent + 1
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._out_scheduled = False
        self._link: ServerLink | None = None
        self._handshaken_once = False
        self._reconnect_task: asyncio.Task[None] | None = None
        self._waiters = Waiters(self._loop)
        self._force_target: int | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._tick_interval = max(0.01, min(0.5, resend_timeout / 4))
        self._tick_handle: asyncio.TimerHandle | None = None

        self.sent_blocks = 0
        self.flushed_blocks = 0
        self.resends = 0
        self.reconnect_resends = 0
        self.reconnects = 0
        self.last_flushed: int | None = None

    # -- facts --
    @property
    def next_sequence(self) -> int:
        """The sequence after the highest one sent (where a continuing client starts)."""
        return self._next

    @property
    def servers(self) -> list[str]:
        return list(self._failover.servers)

    @property
    def server(self) -> str | None:
        """The server connected to; None while (re)connecting."""
        return self._link.address if self._link is not None else None

    @property
    def connected(self) -> bool:
        return self._link is not None

    @property
    def unflushed_blocks(self) -> int:
        return len(self._buf)

    @property
    def unflushed_bytes(self) -> int:
        return self._buf.size

    def stats(self) -> ClientStats:
        return ClientStats(self.sent_blocks, self.flushed_blocks, len(self._buf),
                           self._buf.size, self.resends, self.reconnect_resends,
                           self.reconnects, self.last_flushed, self.server)

    def lowest_unflushed(self) -> int | None:
        """The lowest sequence sent and not yet flushed, None when all are flushed."""
        return self._buf.lowest()

    # -- connecting --
    @classmethod
    async def open(cls, servers: Sequence[str], vdisk_id: str, first_sequence: int | None = 0,
                   timeout: float | None = 30.0, **options: Any) -> TlogClient:
        """Create a client and `connect` it."""
        client = cls(servers, vdisk_id, first_sequence, **options)
        try:
            await client.connect(timeout)
        except BaseException:
            await client.close()
            raise
        return client

    async def connect(self, timeout: float | None = 30.0) -> None:
        """Connect to the first server that accepts, in list order, retrying until ``timeout``.

        Raises a `HandshakeError` subclass when every server refuses the
        handshake for good, `ConnectionError` when none could be reached in time.
        """
        self._check_usable()
        if self._link is not None:
            return
        deadline = None if timeout is None else self._loop.time() + timeout
        link = await self._dial(0, deadline)
        self._activate(link)
        if self._tick_handle is None:
            self._tick_handle = self._loop.call_later(self._tick_interval, self._tick)

    async def new_epoch(self, timeout: float | None = 30.0) -> int:
        """Start a new epoch right after the log's last sequence, as a client created with
        ``first_sequence=None, reset_first_sequence=True`` does (connect again with both
        flags): the server closes the vdisk's other connections and drops what they sent
        that it did not take in order. Every block must be flushed first (`wait_flushed`).
        Returns the new epoch."""
        self._check_usable()
        if self._buf:
            raise ValueError(f"vdisk {self.vdisk_id}: a new epoch needs every block flushed "
                             f"({len(self._buf)} are not)")
        self._continue = True
        self.reset_first_sequence = True
        self._handshaken_once = False  # the next handshake asks for both
        link, self._link = self._link, None
        if link is not None:
            link.abort()  # not _lose: no reconnect task, this one dials
        task = self._reconnect_task
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        deadline = None if timeout is None else self._loop.time() + timeout
        self._activate(await self._dial(max(0, self._failover.index), deadline))
        return self.epoch

    async def _dial(self, start: int, deadline: float | None) -> ServerLink:
        return await self._failover.dial(start, deadline, self._connect_once, self._check_open)

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError("client closed")

    async def _connect_once(self, address: str, timeout: float) -> ServerLink:
        def handshake() -> bytes:
            first = self._handshake_sequence()
            reset = self.reset_first_sequence and not self._handshaken_once
            cont = self._continue and not self._handshaken_once
            return ClientConnection.send_handshake(self.vdisk_id, first, reset, self.version,
                                                   self._token, cont, self.ask_range_ops)
        link, response = await open_link(
            address, handshake, timeout, max_response_size=self.max_response_size,
            on_responses=self._on_responses, on_lost=self._lose, tls=self.tls,
            server_hostname=self.server_hostname)
        if self._ranges and not response.range_ops:
            link.abort()
            raise ConnectionError(f"{address} does not take range operations, and "
                                  f"{len(self._ranges)} unflushed one(s) must be sent again")
        self.epoch = response.epoch
        self.range_ops = response.range_ops
        if self._closed:
            link.abort()
            raise ClientClosedError("client closed")
        if not self._handshaken_once:
            self.log_position = response
            if self._continue and not self._buf:
                # Continue after what the vdisk holds (0 for a vdisk with nothing yet).
                self.first_sequence = self._next = response.next_sequence
                self._buf = UnflushedBuffer(self._next)
                log.info("vdisk %s: continuing the log at sequence %d (epoch %d)",
                         self.vdisk_id, self._next, response.epoch)
        return link

    def _handshake_sequence(self) -> int:
        low = self.lowest_unflushed()
        return self._next if low is None else low

    def _activate(self, link: ServerLink, resend: bool = False) -> None:
        """Make ``link`` current; write every unflushed block, then pending commands."""
        self._link = link
        self._handshaken_once = True
        self._out = self._buf.rewrite_all(self._loop.time())
        self._out_bytes = 0
        if resend:
            self.reconnect_resends += len(self._out)
        low = self.lowest_unflushed()
        target = self._force_target
        if target is not None and low is not None and low <= target:
            self._out.append(ClientConnection.send_force_flush(target))
        for _ in range(self._waiters.pending_syncs()):
            self._out.append(ClientConnection.send_wait_nbd_slave_sync())
        self._write_out()
        log.info("vdisk %s: connected to %s (%d unflushed block(s) sent)", self.vdisk_id,
                 link.address, len(self._buf))

    def _lose(self, link: ServerLink, reason: str, flush_failed: bool = False) -> None:
        """Drop ``link``; when it is the current one, start reconnecting."""
        if link is self._link:
            self._link = None
            self._out = []
            self._out_bytes = 0
            self._buf.connection_lost()
            if not self._closed and self._error is None:
                log.warning("vdisk %s: lost tlogserver %s (%s); %d unflushed block(s) kept, "
                            "reconnecting", self.vdisk_id, link.address, reason,
                            len(self._buf))
                if self._reconnect_task is None or self._reconnect_task.done():
                    self._reconnect_task = self._loop.create_task(
                        self._reconnect(flush_failed), name=f"tlog reconnect {self.vdisk_id}")
        link.abort()

    async def _reconnect(self, flush_failed: bool = False) -> None:
        try:
            if flush_failed:
                # A server that keeps failing to flush would otherwise be reconnected to,
                # and sent the whole buffer, at the pace of its retries.
                await self._failover.pause_after_flush_failed()
            link = await self._dial(self._failover.index + 1, None)
        except ClientClosedError:
            return
        except HandshakeError as exc:
            log.error("vdisk %s: every tlogserver refused the handshake: %s", self.vdisk_id, exc)
            self._fail(exc)
            return
        self.reconnects += 1
        self._activate(link, resend=True)

    # -- sending --
    async def send(self, operation: int, sequence: int, index: int, timestamp: int | None,
                   data: bytes | memoryview) -> None:
        """Log one block; returns once it is buffered (waits only while the buffer is full).

        ``timestamp`` None means now (nanoseconds since the epoch).
        """
        if self._error is not None:
            raise self._reraise()
        frame = encode_block(sequence, index, time.time_ns() if timestamp is None else timestamp,
                             data, operation)
        if self._waiters.want_room or not self._room_for(len(frame)):
            await self._waiters.wait_room(sequence, frame)  # _release puts the frame
        else:
            self._put(sequence, frame)
        if self._out_bytes >= WRITE_BATCH:
            self._write_out()
            await asyncio.sleep(0)  # let the loop read the answers

    async def delete_range(self, sequence: int, first: int, count: int,
                           timestamp: int | None = None) -> int:
        """Log the deletion of blocks ``[first, first + count)`` (a trim) from ``sequence``:
        one entry where the server takes ranges (`range_ops`), else a delete per block
        under consecutive sequences; the last sequence used. RangeError: nothing sent."""
        data = range_data(first, count)
        ts = time.time_ns() if timestamp is None else timestamp
        if not self.range_ops:
            for i in range(count):
                await self.send(Operation.DELETE, sequence + i, first + i, ts, b"")
            return sequence + count - 1
        self._ranges.add(sequence)
        await self.send(Operation.DELETE_RANGE, sequence, first, ts, data)
        return sequence

    def _put(self, sequence: int, frame: bytes) -> None:
        """Buffer an encoded block and queue its write (loop thread; never blocks)."""
        buf = self._buf
        buf.put(sequence, frame)
        self.sent_blocks += 1
        if sequence >= self._next:
            self._next = sequence + 1
        if self._link is not None:
            buf.written(sequence, self._loop.time())
            self._out.append(frame)
            self._out_bytes += len(frame)
            if not self._out_scheduled:
                self._out_scheduled = True
                self._loop.call_soon(self._write_out)

    def _write_out(self) -> None:
        self._out_scheduled = False
        if self._out:
            out, self._out = self._out, []
            self._out_bytes = 0
            if self._link is not None:
                self._link.writelines(out)

    def _room_for(self, size: int) -> bool:
        return self._buf.room_for(size, self.max_unflushed_bytes)

    def _release(self) -> None:
        """Buffer room came back: admit waiting sends, first come first served."""
        self._waiters.admit(self._room_for, self._put)
        for hook in self._release_hooks:
            hook()

    # -- commands --
    def force_flush_at(self, sequence: int) -> None:
        """Ask the server to flush everything pending once ``sequence`` has arrived.

        Remembered: sent again after a reconnect while blocks up to it are unflushed.
        """
        self._check_usable()
        if self._force_target is None or sequence > self._force_target:
            self._force_target = sequence
        self._command(ClientConnection.send_force_flush(sequence))

    def _command(self, data: bytes) -> None:
        if self._link is not None:
            self._out.append(data)
            self._write_out()

    async def wait_flushed(self, sequence: int | None = None, timeout: float | None = None,
                           force: bool = True) -> None:
        """Wait until every block sent with a sequence <= ``sequence`` is flushed.

        ``sequence`` None means every block sent so far. With ``force`` the
        server is asked to flush now rather than at its flush size or time:
        what an NBD FLUSH needs. Raises TimeoutError after ``timeout`` seconds.
        """
        self._check_usable()
        target = self._next - 1 if sequence is None else sequence
        low = self.lowest_unflushed()
        if low is None or low > target:
            return
        if force:
            self.force_flush_at(min(target, self._next - 1))
        future = self._waiters.wait_flushed(target)
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise TimeoutError(
                f"vdisk {self.vdisk_id}: blocks up to sequence {target} not flushed within "
                f"{timeout} s ({len(self._buf)} unflushed, lowest "
                f"{self.lowest_unflushed()})") from None

    async def wait_nbd_slave_sync(self, timeout: float | None = None) -> None:
        """Send WaitNbdSlaveSync and wait for the server's WaitNbdSlaveSyncReceived: the
        vdisk's standby holds every block the server flushed. Raises `SlaveSyncError` when
        the server says it cannot (no standby, or not in step within its timeout)."""
        self._check_usable()
        future = self._waiters.wait_sync()
        self._command(ClientConnection.send_wait_nbd_slave_sync())
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise TimeoutError(f"vdisk {self.vdisk_id}: no WaitNbdSlaveSyncReceived within "
                               f"{timeout} s") from None

    def change_servers(self, servers: Sequence[str]) -> None:
        """Use another server list; leaves the current server if it is not in it."""
        self._check_usable()
        link = self._link
        if self._failover.change(servers, link.address if link is not None else None):
            assert link is not None
            self._lose(link, "no longer in the server list")

    def responses(self) -> ResponseStream:
        """An async iterator over every response from now on (see `ResponseStream`)."""
        return self._answers.stream()

    async def close(self) -> None:
        """Stop: pending writes go out, the connection closes, waiters get ClientClosedError.

        Unflushed blocks are dropped: call `wait_flushed` first to keep them.
        """
        if self._closed:
            return
        self._closed = True
        self._failover.kick.set()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        task = self._reconnect_task
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        link, self._link = self._link, None
        if link is not None:
            if self._out:
                link.writelines(self._out)
            if link.transport is not None:
                link.transport.close()
        self._out = []
        self._fail(ClientClosedError("client closed"))

    async def __aenter__(self) -> TlogClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- failure --
    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._reraise()

    # -- for facades driving the client from another thread (`ThreadedClient`) --
    def add_release_hook(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` in the loop whenever buffer room comes back or the client fails."""
        self._release_hooks.append(hook)

    def failure(self) -> BaseException | None:
        """A fresh copy of the error the client failed with for good; None while usable."""
        return None if self._error is None else self._reraise()

    def put_frame(self, sequence: int, frame: bytes) -> None:
        """Loop thread: buffer an already encoded block and queue its write (never waits:
        the caller keeps the buffer bound itself)."""
        self._put(sequence, frame)

    def note_ranges(self, sequences: Sequence[int]) -> None:
        """Loop thread: these sequences (put with `put_frame`) are range operations, which
        only a server that takes them may be sent again."""
        self._ranges.update(sequences)

    def write_queued(self) -> None:
        """Loop thread: write what `put_frame` queued, now."""
        self._write_out()

    def _reraise(self) -> BaseException:
        assert self._error is not None
        err = self._error
        if isinstance(err, HandshakeError):
            return type(err)(err.status, err.address)
        return type(err)(*err.args)

    def _fail(self, exc: BaseException) -> None:
        """No way forward (closed, or refused for good): wake every waiter with ``exc``."""
        if self._error is None:
            self._error = exc
        self._waiters.fail(self._reraise)
        self._answers.end()
        for hook in self._release_hooks:
            hook()

    # -- what the server says --
    def _on_responses(self, link: ServerLink, responses: list[BlockResponse]) -> None:
        buf = self._buf
        flushed = 0
        for status, seqs in responses:
            if status == RECV_OK:
                buf.received(seqs)
            elif status == FLUSH_OK:
                flushed += buf.flushed(seqs)[0]
                if self._ranges:
                    self._ranges.difference_update(seqs)
                if seqs:
                    high = max(seqs)
                    if self.last_flushed is None or high > self.last_flushed:
                        self.last_flushed = high
            elif status == RECV_FAILED:  # sent again after the resend timeout
                buf.refused(seqs, self._loop.time())
            elif status == FLUSH_FAILED:
                log.warning("vdisk %s: %s reports FlushFailed for %d block(s)", self.vdisk_id,
                            link.address, len(seqs))
                if self.reconnect_on_flush_failed and link is self._link:
                    self._lose(link, "the server failed to flush", flush_failed=True)
            elif status == SLAVE_SYNC_OK or status == SLAVE_SYNC_FAILED:
                if link is self._link:
                    self._waiters.answer_sync(None if status == SLAVE_SYNC_OK else SlaveSyncError(
                        f"vdisk {self.vdisk_id}: {link.address} cannot sync the standby "
                        "(no standby, or not in step in time: see its log)"))
        if flushed:
            self._failover.flushed()
            self.flushed_blocks += flushed
            if self._waiters.want_room or self._release_hooks:
                self._release()
            if self._waiters.want_flushed:
                self._waiters.flushed_below(self.lowest_unflushed())
        # The user's side last: the client's own books are right whatever it does.
        if self._answers.wanted:
            self._answers.deliver(responses)

    @property
    def callback_errors(self) -> int:
        """Times ``on_response`` raised (each logged, not propagated)."""
        return self._answers.callback_errors

    def _tick(self) -> None:
        """The periodic check: resend blocks without RecvOK; give up on a silent server."""
        self._tick_handle = self._loop.call_later(self._tick_interval, self._tick)
        link = self._link
        if link is None:
            return
        buf = self._buf
        now = self._loop.time()
        if not buf.awaiting:
            link.last_rx = now  # nothing owed: silence so far is no stall
            return
        expired = buf.expired(now - self.resend_timeout)
        if not expired:
            return
        if self.stall_timeout and now - link.last_rx > self.stall_timeout:
            self._lose(link, f"no answer for {now - link.last_rx:.1f} s")
            return
        frames = buf.resend(expired, now)
        if frames:
            self._out.extend(frames)
            self.resends += len(frames)
            log.info("vdisk %s: resending %d block(s) without RecvOK after %g s (from %d)",
                     self.vdisk_id, len(frames), self.resend_timeout, expired[0])
            self._write_out()
