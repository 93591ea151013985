"""One vdisk on the server: orders its blocks by sequence and decides when to flush.

A `Vdisk` is driven by plain method calls from its connections (no queues, no
task of its own besides the flusher's): `receive` answers a block at once and
moves it into order, `force_flush` and the flush timer cut aggregations, and the
flusher calls back with what got stored, which is then announced to every
connection of the vdisk.

Sequences, for a vdisk whose next expected sequence is ``expected``:
``[flushed_next, expected)`` have been received in order and are stored or on
their way; ``ahead`` holds later ones that arrived early, within a bounded
window; anything below ``flushed_next`` is stored.

A block below ``expected`` is either a resend of the very write received
before (same index, operation, timestamp and hash), answered without being
stored again, or a new write under a sequence already used: a client that
started its numbering again (an NBD server restarting at 0) without
``resetFirstSequence``. Such a block begins a new **epoch** of the vdisk, as
a reset does: the blocks of a later epoch win over everything before them on
restore (docs/durability.md). So every FlushOK names a write a restore
replays. Telling the two apart needs what a stored sequence wrote: a
handshake whose first sequence is below ``flushed_next`` has those writes
read back from storage first (`tlog.read.resends.stored_writes`).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from tlog.protocol import Block, wire
from tlog.protocol.ranges import DELETE_RANGE, RangeError, range_count
from tlog.protocol.status import BlockStatus, HandshakeStatus
from tlog.record.identity import StoredWrites, write_identity

from .budget import Refusal, ServerBudget, VdiskBudget
from .config import ServerConfig
from .flusher import Batch, Flusher, FlushListener
from .logs import ContextLogger
from .stats import ServerStats

log = logging.getLogger(__name__)

#: Stored sequences a handshake may claim to resend, whose writes are read back to check
#: them. A client whose first sequence lies further back is not resending (no client holds
#: that many stored blocks without their FlushOK): it numbers anew, and gets a new epoch.
RESEND_CHECK_BLOCKS = 65536


#: Builds a vdisk's flusher around it: the vdisk is the flusher's listener.
FlusherFactory = Callable[[FlushListener], Flusher]

#: How stored writes are read back: ``read(head, from_sequence, epoch, limit)`` ->
#: `tlog.read.resends.stored_writes` on the vdisk's pool.
StoredWritesReader = Callable[[bytes, int, int, int], Awaitable[StoredWrites]]


class Peer(Protocol):
    """What a vdisk needs of a connection."""

    name: str
    log: ContextLogger  # carries the connection's context (conn, peer, vdisk)
    #: The first sequence of the peer's handshake (moved by a new epoch it starts): a
    #: resend at or above it, stored after the handshake, is the peer's own write.
    session_start: int

    def send(self, data: bytes) -> None: ...

    def close(self, reason: str) -> None: ...


def _response(status: BlockStatus, sequences: list[int] | tuple[int, ...]) -> bytes:
    return wire.encode_response(int(status), sequences)


def _identity(b: Block) -> bytes:
    return write_identity(b.index, b.operation, b.timestamp, b.hash)


@dataclass(frozen=True)
class HandshakeResult:
    """A vdisk's answer to a handshake: the status, where its log stood before the
    handshake (for the response's fields), and the stored sequences whose writes must be
    read back before the client's blocks are looked at (``check_from`` None: none)."""

    status: HandshakeStatus
    has_log: bool = False
    last_sequence: int = 0
    epoch: int = 0
    check_from: int | None = None


class Vdisk:
    """The ordering window, flush triggers and FlushOK fan-out of one vdisk; the listener
    of its flusher (`tlogserver.flusher.FlushListener`)."""

    def __init__(self, vdisk_id: str, config: ServerConfig, flusher: FlusherFactory,
                 on_retire: Callable[[Vdisk], None], stats: ServerStats | None = None, *,
                 epoch: int = 0, last_sequence: int | None = None, has_chain: bool = False,
                 server_budget: ServerBudget | None = None, takes_ranges: bool = True) -> None:
        self.id = vdisk_id
        self.stats = stats if stats is not None else ServerStats()
        self.log = ContextLogger(log, vdisk=vdisk_id)
        self.flusher = flusher(self)  # (it calls nothing back before it is started)
        self._on_retire = on_retire
        self.peers: set[Peer] = set()
        #: The bytes of the blocks held (``ahead``, ``pending``), within the server's budget.
        self.budget = VdiskBudget(
            server_budget if server_budget is not None else ServerBudget(1 << 62),
            config.max_buffered_bytes, config.max_pending_bytes)
        #: Set by the first handshake (until then nothing is received).
        self.expected: int | None = None
        #: The vdisk's epoch, from the chain's head; each reset starts the next (the
        #: flusher seals it into every aggregation, and its results for older epochs do not
        #: move ``flushed_next``).
        self.epoch = epoch
        #: The highest sequence stored or received in order in the epoch, None when the
        #: epoch has none (what the handshake response reports).
        self.last_in_order = last_sequence
        self.flushed_next = 0 if last_sequence is None else last_sequence + 1
        #: Whether the vdisk has a chain or blocks at all (a reset of a vdisk without any
        #: starts no new epoch).
        self._has_chain = has_chain or last_sequence is not None
        self.ready: list[Block] = []
        self.ahead: dict[int, Block] = {}
        self._force_at: list[int] = []
        self._timer: asyncio.TimerHandle | None = None
        self._ready_since = 0.0  # time.monotonic() when the timer was armed: oldest ready block
        #: What stored sequences wrote (`write_identity`), read back for a handshake that
        #: resends them; None when no resend is being checked.
        self._writes: dict[int, bytes] | None = None
        self._loading = 0  # reads of ``_writes`` in progress (stored rounds are added to it)
        # While ``_writes`` is known: the sequences of the epoch below this were compacted
        # (what they wrote is unknown)
        self._compacted_below = 0
        self.retired = False
        #: Whether range deletes can be stored (v2 records; the legacy format cannot).
        self.takes_ranges = takes_ranges
        #: Why the vdisk was given up (see `abandon`), None while it is in use.
        self.abandoned: str | None = None
        self.apply(config)

    def apply(self, config: ServerConfig) -> None:
        """Take the flush and window settings of ``config`` (at creation and on reload).

        A smaller flush size cuts what is already pending at once; a new flush time counts
        from the next block that finds nothing pending.
        """
        self._flush_size = config.flush_size
        self._flush_time = config.flush_time
        self._window = config.max_buffered_blocks
        self.budget.max_ahead = config.max_buffered_bytes
        self.budget.max_pending = config.max_pending_bytes
        while len(self.ready) >= self._flush_size:
            self._cut(self._flush_size)

    # -- connections --
    def handshake(self, peer: Peer, first_sequence: int, reset: bool,
                  continue_sequence: bool = False) -> HandshakeResult:
        """Admit ``peer``. ``continue_sequence``: it starts after the last sequence, whatever
        ``first_sequence`` says; ``reset``: it starts a new epoch at ``first_sequence``, or,
        with ``continue_sequence`` too, right after the last sequence (a client that must
        shut out whatever an earlier run of it may still have in flight, and keep its
        numbering going). The result says where the log stood and the epoch the peer's
        blocks go to."""
        if self.retired:
            return HandshakeResult(HandshakeStatus.INTERNAL_SERVER_ERROR)
        has_log, last = self.last_in_order is not None, self.last_in_order or 0
        check_from: int | None = None
        if reset and continue_sequence:
            first_sequence = self.expected if self.expected is not None else self.flushed_next
        if reset:
            if self.expected is None and not self._has_chain:
                self.expected = self.flushed_next = first_sequence
                self._set_epoch_start(first_sequence)
            else:
                self._reset(peer, first_sequence, "reset")
            peer.session_start = first_sequence
        elif continue_sequence:
            if self.expected is None:
                self.expected = self.flushed_next
            peer.session_start = self.expected
        else:
            peer.session_start = first_sequence
            if self.expected is None:
                if first_sequence >= self.flushed_next:
                    self.expected = self.flushed_next = first_sequence
                else:
                    self.expected = self.flushed_next
            if first_sequence < self.flushed_next:
                if self.flushed_next - first_sequence > RESEND_CHECK_BLOCKS:
                    peer.log.warning(
                        "first sequence %d is %d below the stored log of epoch %d: not a "
                        "resend, a new numbering", first_sequence,
                        self.flushed_next - first_sequence, self.epoch)
                    self._reset(peer, first_sequence, "far_resend")
                else:
                    check_from = first_sequence
        self.peers.add(peer)
        self.flusher.retry_now()  # a client is back: try storage again at once if it failed
        return HandshakeResult(HandshakeStatus.OK, has_log, last, self.epoch, check_from)

    async def load_writes(self, first_sequence: int,
                          read: StoredWritesReader
                          ) -> None:
        """Learn what the stored sequences from ``first_sequence`` on wrote, so that the
        resends among a client's blocks can be told from new writes.

        ``read(head, from_sequence, epoch, limit)`` reads them back from the chain (see
        `tlog.read.resends.stored_writes`); rounds stored meanwhile are added as they complete.
        """
        epoch = self.epoch
        if self._writes is None:
            self._writes = {}
            self._compacted_below = 0
        self._loading += 1
        try:
            found = await read(self.flusher.stored_head, first_sequence, epoch,
                               RESEND_CHECK_BLOCKS)
        finally:
            self._loading -= 1
        if self.epoch == epoch and self._writes is not None:
            for seq, identity in found.identities.items():
                self._writes.setdefault(seq, identity)
            self._compacted_below = max(self._compacted_below, found.compacted_below)

    def _reset(self, peer: Peer, first_sequence: int, reason: str) -> None:
        """Start a new epoch at ``first_sequence``: the other clients are closed, buffered
        out-of-order blocks dropped and the ordered ones flushed in the old epoch."""
        peer.log.info("vdisk %s: epoch %d starts at sequence %d (%s; %d buffered "
                      "out-of-order block(s) dropped)", self.id, self.epoch + 1, first_sequence,
                      {"reset": "resetFirstSequence",
                       "reused_sequence": "a sequence reused for a different write",
                       "far_resend": "first sequence far below the stored log"}[reason],
                      len(self.ahead))
        for other in list(self.peers):
            if other is not peer:
                other.close("another client started a new epoch of the vdisk")
                self.peers.discard(other)
        self._drop_ahead()
        self._force_at.clear()
        self._cut(len(self.ready))
        self.epoch += 1
        self.stats.epoch_started(reason)
        self._writes = None
        self.expected = self.flushed_next = first_sequence
        self._set_epoch_start(first_sequence)
        peer.session_start = first_sequence

    def _set_epoch_start(self, first_sequence: int) -> None:
        # Nothing received in the epoch yet: a client that continues starts at first_sequence.
        self.last_in_order = first_sequence - 1 if first_sequence else None
        self._has_chain = True

    def _drop_ahead(self) -> None:
        self.ahead.clear()
        self.budget.drop_ahead()

    @property
    def ahead_bytes(self) -> int:
        """Data bytes of the blocks held ahead of their turn."""
        return self.budget.ahead

    @property
    def pending_bytes(self) -> int:
        """Data bytes of the blocks received in order and not stored yet."""
        return self.budget.pending

    def disconnect(self, peer: Peer) -> None:
        self.peers.discard(peer)
        self._maybe_retire()

    # -- blocks --
    def receive(self, block: Block, out: list[bytes], sender: Peer) -> None:
        """Take one block sent by ``sender``; appends the bytes of its immediate answers to
        ``out``. Who sent it decides whether a reused sequence is its own resend."""
        seq = block.sequence
        if not block.hash_ok():
            sender.log.warning("block %d has a wrong hash, answered RecvFailed", seq)
            self.stats.recv_failed_hash += 1
            out.append(_response(BlockStatus.RECV_FAILED, (seq,)))
            return
        if block.operation > 2 or block.operation < 1:  # (not a set or a delete: rare)
            refused = self._refused_operation(block)
            if refused is not None:
                sender.log.warning("block %d refused, answered RecvFailed: %s", seq, refused)
                self.stats.recv_failed_operation += 1
                out.append(_response(BlockStatus.RECV_FAILED, (seq,)))
                return
        expected = self.expected
        assert expected is not None
        if seq == expected:
            ahead = self.ahead
            refusal = self.budget.admit(len(block.data), bool(ahead))
            if refusal is not None:
                # Storage is behind (or down), or the server's buffers are full (and this
                # block unblocks nothing buffered here): not kept, the client resends it.
                self._refuse(refusal, seq, out)
                return
            ready = self.ready
            ready.append(block)
            expected += 1
            if ahead and expected in ahead:  # it unblocks the ones that arrived early
                moved = 0
                while expected in ahead:
                    nxt = ahead.pop(expected)
                    moved += len(nxt.data)
                    ready.append(nxt)
                    expected += 1
                self.budget.to_pending(moved)
            self.expected = expected
            self.last_in_order = expected - 1
            self._writes = None  # the resends are over: this is a new write
            out.append(wire.recv_ok(seq))
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
            held = self.ahead.get(seq)
            if held is not None:
                if _identity(held) != _identity(block):
                    # Another write for a sequence not received in order yet: nothing
                    # was promised for the first (no FlushOK), the newest is kept.
                    self.ahead[seq] = block
                    self.budget.replace(len(held.data), len(block.data))
                else:
                    self.stats.duplicate_blocks += 1
                out.append(wire.recv_ok(seq))
            else:
                # Beyond the window (not kept; the client resends it once it got closer),
                # or the server's buffers are full.
                refusal = ("window" if seq - expected > self._window
                           else self.budget.admit_ahead(len(block.data)))
                if refusal is not None:
                    self._refuse(refusal, seq, out)
                else:
                    self.ahead[seq] = block
                    out.append(wire.recv_ok(seq))
        elif self._same_write(block, sender):
            self.stats.duplicate_blocks += 1
            out.append(wire.recv_ok(seq))
            if seq < self.flushed_next:
                out.append(_response(BlockStatus.FLUSH_OK, (seq,)))
            # otherwise it is pending or being stored: its FlushOK will come
        else:
            self._new_write(block, out, sender)

    def _refuse(self, why: Refusal, seq: int, out: list[bytes]) -> None:
        """Answer RecvFailed for a block not kept for lack of room (counted by ``why``)."""
        stats = self.stats
        if why == "pending":
            stats.recv_failed_pending += 1
        elif why == "window":
            stats.recv_failed_window += 1
        else:
            stats.recv_failed_server += 1
        out.append(_response(BlockStatus.RECV_FAILED, (seq,)))

    def _refused_operation(self, block: Block) -> str | None:
        """Why a block whose operation is neither a set nor a delete is not taken; None for
        a range delete this server can store (`tlog.protocol.ranges`)."""
        if block.operation != DELETE_RANGE:
            return f"unknown operation {block.operation}"
        if not self.takes_ranges:
            return "range operations cannot be stored in the legacy (0-Disk) record format"
        try:
            range_count(block.index, block.data)
        except RangeError as exc:
            return str(exc)
        return None

    def _same_write(self, block: Block, sender: Peer) -> bool:
        """Whether ``block``, below ``expected``, is the write received before under its
        sequence (a resend), rather than a new write reusing the sequence."""
        seq = block.sequence
        if seq >= self.flushed_next:  # pending, or being stored: compare with it
            ready = self.ready
            if ready and ready[0].sequence <= seq:
                held: Block | None = ready[seq - ready[0].sequence]
            else:
                held = self.flusher.pending_block(seq)
            return held is None or _identity(held) == _identity(block)
        writes = self._writes
        known = writes.get(seq) if writes is not None else None
        if known is not None:
            return known == _identity(block)
        if writes is not None and seq < self._compacted_below:
            # Compacted: what it wrote is no longer known. Taken for a new write (a new
            # epoch): a client resending a stored tail resends all of it, in order, so
            # replaying it again in a new epoch gives the same state; a new write taken for
            # a resend would be lost.
            return False
        # Stored after the sender's handshake, at or above its first sequence: its own
        # earlier block, whose answer it has not seen yet.
        return seq >= sender.session_start

    def _new_write(self, block: Block, out: list[bytes], sender: Peer) -> None:
        """A different write under a sequence the epoch already holds: the client numbers
        anew. Start a new epoch at its sequence, then take it in order."""
        sender.log.warning("sequence %d of vdisk %s was used before for a different write: "
                           "the client numbers anew without resetFirstSequence",
                           block.sequence, self.id)
        self._reset(sender, block.sequence, "reused_sequence")
        self.receive(block, out, sender)

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
        self.flusher.submit(blocks, self.epoch)
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
        if self.abandoned is not None:
            # A round in flight when the vdisk was given up: its bytes were released then,
            # and its clients are gone.
            return
        for batch in batches:
            seqs = [b.sequence for b in batch.blocks]
            self.budget.stored(sum(len(b.data) for b in batch.blocks))
            if batch.epoch != self.epoch:
                # Stored in an epoch that has ended: its clients are gone, and the sequences
                # now name other writes; telling the new clients would be a lie.
                continue
            self.flushed_next = max(self.flushed_next, max(seqs) + 1)
            if self._loading and self._writes is not None:
                for b in batch.blocks:
                    self._writes.setdefault(b.sequence, _identity(b))
            self._broadcast(_response(BlockStatus.FLUSH_OK, seqs))
        self._maybe_retire()

    def on_failed(self, batches: list[Batch], exc: Exception) -> None:
        if self.abandoned is not None:
            return
        for batch in batches:
            if batch.epoch == self.epoch:
                self._broadcast(_response(BlockStatus.FLUSH_FAILED,
                                          [b.sequence for b in batch.blocks]))

    def keep_retrying(self) -> bool:
        """A failing round is retried while a client is connected (see `tlogserver.flusher`:
        without one, the client moved on, maybe to another server)."""
        return bool(self.peers)

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
            "epoch": self.epoch,
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
        # Nothing more is stored for it (a round already sent cannot be called back; its
        # callbacks are ignored from now on).
        dropped += self.flusher.discard()
        dropped += len(self.ready) + len(self.ahead)
        self.log.warning("vdisk closed: %s (%d unacknowledged block(s) dropped in all)",
                         reason, dropped)
        self.ready.clear()
        self.ahead.clear()
        self.budget.release()  # all of it (on_stored ignores a round still in flight)
        self._writes = None
        self._force_at.clear()
        for peer in list(self.peers):
            peer.close(f"vdisk given up: {reason}")
        self.peers.clear()
        self.retired = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._on_retire(self)

    async def drain(self) -> None:
        """Flush everything ordered and wait until it is stored."""
        self.flush_all()
        await self.flusher.wait_idle()
