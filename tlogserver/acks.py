"""The answers of small reads, held back and written together.

A client that writes one block per send (an NBD server under a synchronous workload) would
cost one write, and one wake-up of the client, per block if every read were answered at
once. So the answers (RecvOK...) of a read of fewer than `HOLD_BELOW_BLOCKS` blocks that
comes less than ``ack_delay`` after the last write to the client are held, and written
``ack_delay`` after that write, together with those of the reads in between: at most one
answer write per ``ack_delay`` for such a client. Any other write (a FlushOK, a handshake
answer, a close) takes the held answers along first, so answers never change order.

A client that streams small writes without asking for a flush (`STREAMING_BLOCKS` messages
and more since it last asked) also has its reading paused while answers are held: it is read
again when they go out, many blocks at once, instead of waking the server up for each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from time import perf_counter
from typing import Protocol

from .stats import Histogram

#: Reads carrying fewer blocks than this have their answers held for ``ack_delay``; bigger
#: reads are answered at once.
HOLD_BELOW_BLOCKS = 4
#: Messages received since the client last asked for a flush (ForceFlush, WaitNbdSlaveSync)
#: after which it counts as streaming: its small reads then pause reading until the held
#: answers are written.
STREAMING_BLOCKS = 64
#: Held answers are written at once when they reach this many bytes.
HOLD_MAX_BYTES = 16 * 1024


class Reading(Protocol):
    """The reading side of a connection, paused for a streaming client."""

    def pause(self, reason: str) -> None: ...

    def resume(self, reason: str) -> None: ...


class AckBatcher:
    """Every write to one client goes through here: answers of small reads are held (see
    the module doc), anything else is written at once behind them."""

    def __init__(self, write: Callable[[bytes], None], reading: Reading,
                 latency: Histogram) -> None:
        self._write = write  # to the client, now
        self._reading = reading
        self._latency = latency  # read-to-answer-written seconds (tlog_recv_latency)
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._held_since = 0.0  # perf_counter of the oldest read held
        self._timer: asyncio.TimerHandle | None = None
        self._last_write = 0.0  # perf_counter of the last write
        self._unflushed = 0  # messages since the client last asked for a flush
        self._streaming = False  # reading paused until the held answers go out

    @property
    def held_bytes(self) -> int:
        """Bytes of answers held now."""
        return self._held_bytes

    def read(self, messages: int, flush_asked: bool) -> None:
        """Count a read of ``messages``; ``flush_asked``: one of them asks for a flush, whose
        answer the client waits for, so it is not streaming (its reads are not paused)."""
        self._unflushed = 0 if flush_asked else self._unflushed + messages

    def answer(self, answers: bytes, blocks: int, started: float, delay: float) -> None:
        """The answers to a read of ``blocks`` blocks made at ``started`` (perf_counter;
        0: not timed): written now, or held for up to ``delay`` seconds (ack_delay)."""
        if blocks < HOLD_BELOW_BLOCKS and (
                self._held or perf_counter() - self._last_write < delay):
            self._hold(answers, started, delay)
            if self._held and self._unflushed >= STREAMING_BLOCKS and not self._streaming:
                # A client streaming small writes: read again when the answers go out.
                # (Not when the hold just wrote them: nothing would resume reading.)
                self._streaming = True
                self._reading.pause("streaming")
        else:
            self.send(answers)
            if started:
                self._latency.observe(perf_counter() - started)

    def send(self, data: bytes) -> None:
        """Write ``data`` now, after the held answers (their order is kept)."""
        if self._held:
            data = self._take_held() + data
        self._write(data)
        self._last_write = perf_counter()

    def release(self) -> None:
        """Write the held answers now (the connection closes, or their time is up)."""
        if self._held:
            self.send(b"")

    def _hold(self, answers: bytes, started: float, delay: float) -> None:
        if not self._held:
            self._held_since = started or perf_counter()
            self._timer = asyncio.get_running_loop().call_later(
                max(0.0, self._last_write + delay - perf_counter()), self.release)
        self._held.append(answers)
        self._held_bytes += len(answers)
        if self._held_bytes >= HOLD_MAX_BYTES:
            self.release()

    def _take_held(self) -> bytes:
        data = b"".join(self._held)
        self._held.clear()
        self._held_bytes = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._streaming:
            self._streaming = False
            self._reading.resume("streaming")
        self._latency.observe(perf_counter() - self._held_since)
        return data
