"""One vdisk on the server: orders its blocks by sequence and decides when to flush.

A `Vdisk` is driven by plain method calls from its connections (no queues, no
task of its own besides the flusher's): `receive` answers a block at once and
moves it into order, `force_flush` and the flush timer cut aggregations, and the
flusher calls back with what got stored, which is then announced to every
connection of the vdisk.

Sequences, for a vdisk whose next expected sequence is ``expected``:
``[flushed_next, expected)`` have been received in order and are stored or on
their way; ``ahead`` holds later ones that arrived early, within a bounded
window; anything below ``flushed_next`` is a resend of a stored block.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable
from typing import Protocol

from tlog import wire
from tlog.protocol import Block
from tlog.status import BlockStatus, HandshakeStatus

from .config import ServerConfig
from .flusher import Batch, Flusher
from .logs import ContextLogger
from .metrics import ServerStats

log = logging.getLogger(__name__)

#: Bytes of in-order blocks a vdisk holds that are not stored yet (pending, or being stored
#: or retried by the flusher). Beyond it, the next in-order block is answered RecvFailed and
#: not kept, so a vdisk whose storage fails or lags does not fill the server's memory; the
#: client resends the block later.
MAX_PENDING_BYTES = 256 * 1024 * 1024


class Peer(Protocol):
    """What a vdisk needs of a connection."""

    name: str
    log: ContextLogger  # carries the connection's context (conn, peer, vdisk)

    def send(self, data: bytes) -> None: ...

    def close(self, reason: str) -> None: ...


def _response(status: BlockStatus, sequences: list[int] | tuple[int, ...]) -> bytes:
    return wire.encode_response(int(status), sequences)


class Vdisk:
    """The ordering window, flush triggers and FlushOK fan-out of one vdisk."""

    def __init__(self, vdisk_id: str, config: ServerConfig, flusher: Flusher,
                 on_retire: Callable[[Vdisk], None], stats: ServerStats | None = None) -> None:
        self.id = vdisk_id
        self.stats = stats if stats is not None else ServerStats()
        self.log = ContextLogger(log, vdisk=vdisk_id)
        self.flusher = flusher
        self._on_retire = on_retire
        self.peers: set[Peer] = set()
        #: The connection whose read is being handled (set once per read): its log context
        #: goes on what receive() logs.
        self.sender: Peer | None = None
        self.expected: int | None = None
        self.flushed_next = 0
        self.ready: list[Block] = []
        self.ahead: dict[int, Block] = {}
        self.ahead_bytes = 0
        #: Data bytes of the blocks received in order and not stored yet.
        self.pending_bytes = 0
        self._force_at: list[int] = []
        self._timer: asyncio.TimerHandle | None = None
        self._ready_since = 0.0  # time.monotonic() when the timer was armed: oldest ready block
        self._epoch = 0  # bumped by a reset, so stale flush results do not move flushed_next
        self.retired = False
        #: Why the vdisk was given up (see `abandon`), None while it is in use.
        self.abandoned: str | None = None
        flusher.bind(keep_retrying=lambda: bool(self.peers), on_abandon=self.abandon)
        self.apply(config)

    def apply(self, config: ServerConfig) -> None:
        """Take the flush and window settings of ``config`` (at creation and on reload).

        A smaller flush size cuts what is already pending at once; a new flush time counts
        from the next block that finds nothing pending.
        """
        self._flush_size = config.flush_size
        self._flush_time = config.flush_time
        self._window = config.max_buffered_blocks
        self._window_bytes = config.max_buffered_bytes
        while len(self.ready) >= self._flush_size:
            self._cut(self._flush_size)

    # -- connections --
    def handshake(self, peer: Peer, first_sequence: int, reset: bool) -> HandshakeStatus:
        if self.retired:
            return HandshakeStatus.INTERNAL_SERVER_ERROR
        if self.expected is None:
            self.expected = self.flushed_next = first_sequence
        elif reset:
            self._reset(peer, first_sequence)
        self.peers.add(peer)
        self.flusher.retry_now()  # a client is back: try storage again at once if it failed
        return HandshakeStatus.OK

    def _reset(self, peer: Peer, first_sequence: int) -> None:
        peer.log.info("reset the vdisk to first sequence %d (%d buffered out-of-order "
                      "block(s) dropped)", first_sequence, len(self.ahead))
        for other in list(self.peers):
            if other is not peer:
                other.close("another client reset the vdisk's first sequence")
                self.peers.discard(other)
        self.ahead.clear()
        self.ahead_bytes = 0
        self._force_at.clear()
        self._cut(len(self.ready))
        self._epoch += 1
        self.expected = self.flushed_next = first_sequence

    def disconnect(self, peer: Peer) -> None:
        self.peers.discard(peer)
        if self.sender is peer:
            self.sender = None
        self._maybe_retire()

    # -- blocks --
    def receive(self, block: Block, out: list[bytes]) -> None:
        """Take one block; appends the bytes of its immediate answers to ``out``."""
        seq = block.sequence
        if not block.hash_ok():
            (self.sender or self).log.warning("block %d has a wrong hash, answered RecvFailed",
                                              seq)
            self.stats.recv_failed_hash += 1
            out.append(_response(BlockStatus.RECV_FAILED, (seq,)))
            return
        expected = self.expected
        assert expected is not None
        if seq == expected:
            if self.pending_bytes >= MAX_PENDING_BYTES:
                # Storage is behind (or down): not kept, the client resends it later.
                self.stats.recv_failed_pending += 1
                out.append(_response(BlockStatus.RECV_FAILED, (seq,)))
                return
            ready = self.ready
            ready.append(block)
            added = len(block.data)
            expected += 1
            ahead = self.ahead
            while ahead and expected in ahead:
                nxt = ahead.pop(expected)
                size = len(nxt.data)
                self.ahead_bytes -= size
                added += size
                ready.append(nxt)
                expected += 1
            self.pending_bytes += added
            self.expected = expected
            out.append(_response(BlockStatus.RECV_OK, (seq,)))
            if self._force_at and self._force_at[0] < expected:
                while self._force_at and self._force_at[0] < expected:
                    heapq.heappop(self._force_at)
                self._cut(len(ready))
            elif len(ready) >= self._flush_size:
                while len(ready) >= self._flush_size:
                    self._cut(self._flush_size)
            if ready and self._timer is None:
                self._arm_timer()
        elif seq > expected:
            if seq in self.ahead:
                self.stats.duplicate_blocks += 1
                out.append(_response(BlockStatus.RECV_OK, (seq,)))
            elif (seq - expected > self._window
                  or self.ahead_bytes + len(block.data) > self._window_bytes):
                # Beyond the window: not kept; the client resends it once it got closer.
                self.stats.recv_failed_window += 1
                out.append(_response(BlockStatus.RECV_FAILED, (seq,)))
            else:
                self.ahead[seq] = block
                self.ahead_bytes += len(block.data)
                out.append(_response(BlockStatus.RECV_OK, (seq,)))
        else:
            self.stats.duplicate_blocks += 1
            out.append(_response(BlockStatus.RECV_OK, (seq,)))
            if seq < self.flushed_next:
                out.append(_response(BlockStatus.FLUSH_OK, (seq,)))
            # otherwise it is pending or being stored: its FlushOK will come

    def force_flush(self, sequence: int) -> None:
        """ForceFlushAtSeq: flush all pending once ``sequence`` has been received in order."""
        assert self.expected is not None
        if sequence < self.expected:
            self._cut(len(self.ready))
        else:
            heapq.heappush(self._force_at, sequence)

    def flush_all(self) -> None:
        """Hand every ordered pending block to the flusher (drain, reset)."""
        self._cut(len(self.ready))

    def _cut(self, n: int) -> None:
        if n <= 0:
            return
        blocks, self.ready[:n] = self.ready[:n], []
        self.flusher.submit(blocks, self._epoch)
        if not self.ready and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm_timer(self) -> None:
        self._ready_since = time.monotonic()
        self._timer = asyncio.get_running_loop().call_later(self._flush_time, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.ready:
            self.log.debug("flush-time reached, flushing %d block(s)", len(self.ready))
            self._cut(len(self.ready))

    # -- flusher callbacks --
    def on_stored(self, batches: list[Batch]) -> None:
        for batch in batches:
            seqs = [b.sequence for b in batch.blocks]
            self.pending_bytes -= sum(len(b.data) for b in batch.blocks)
            if batch.epoch == self._epoch:
                self.flushed_next = max(self.flushed_next, max(seqs) + 1)
            self._broadcast(_response(BlockStatus.FLUSH_OK, seqs))
        self._maybe_retire()

    def on_failed(self, batches: list[Batch], exc: Exception) -> None:
        for batch in batches:
            self._broadcast(_response(BlockStatus.FLUSH_FAILED, [b.sequence for b in batch.blocks]))

    def _broadcast(self, data: bytes) -> None:
        for peer in list(self.peers):
            peer.send(data)

    # -- metrics --
    def gauges(self, now: float) -> dict[str, float]:
        """The per-vdisk gauges at ``now`` (`time.monotonic`), read when metrics are scraped."""
        flusher = self.flusher
        oldest = flusher.oldest_cut
        if oldest is None and self.ready:
            oldest = self._ready_since
        expected = self.expected
        return {
            "pending_blocks": len(self.ready) + flusher.pending_blocks,
            "out_of_order_blocks": len(self.ahead),
            "out_of_order_bytes": self.ahead_bytes,
            "flush_lag_sequences": 0 if expected is None else expected - self.flushed_next,
            "oldest_pending_seconds": 0.0 if oldest is None else max(0.0, now - oldest),
            "clients": len(self.peers),
            "storage_failing": int(flusher.failing),
        }

    # -- lifecycle --
    @property
    def busy(self) -> bool:
        return bool(self.ready) or not self.flusher.idle

    def _maybe_retire(self) -> None:
        if not self.peers and not self.busy and not self.retired:
            self.retired = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._on_retire(self)

    def abandon(self, reason: str, dropped: int = 0) -> None:
        """The flusher gave up (see `tlogserver.flusher`): forget every block not stored,
        close the vdisk's connections and retire it.

        Nothing acknowledged is lost: only blocks without FlushOK are dropped, which their
        clients still hold. A client that connects again gets a vdisk opened afresh from
        what storage holds, and resends from there.
        """
        if self.retired:
            return
        self.abandoned = reason
        dropped += len(self.ready) + len(self.ahead)
        self.log.warning("vdisk closed: %s (%d unacknowledged block(s) dropped in all)",
                         reason, dropped)
        self.ready.clear()
        self.ahead.clear()
        self.ahead_bytes = 0
        self.pending_bytes = 0
        self._force_at.clear()
        for peer in list(self.peers):
            peer.close(f"vdisk given up: {reason}")
        self.peers.clear()
        self.sender = None
        self.retired = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._on_retire(self)

    async def drain(self) -> None:
        """Flush everything ordered and wait until it is stored."""
        self.flush_all()
        await self.flusher.wait_idle()
