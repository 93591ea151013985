"""The flusher of one vdisk: seal, erasure-code and store aggregations, in order.

It owns the chain: each aggregation's ``prev`` is the hash of the one before.
Batches handed over while a storage round is in flight are sealed and stored
together in the next round (one pipelined request per server), so a busy vdisk
pays one round trip for many aggregations. A failed round is retried with
capped backoff, forever, with the same sealed records: nothing handed over is
dropped, and the vdisk recovers by itself when storage comes back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from tlog.aggregation import SealedRecord
from tlog.erasure import ErasureCoder
from tlog.storage import StorageError, StoragePool, last_hash_key
from tlog.wire import BlockFields

from .logs import ContextLogger
from .metrics import ServerStats

log = logging.getLogger(__name__)

#: Most aggregations stored in one round; bounds the size of one pipeline.
MAX_ROUND = 64
RETRY_MIN = 0.05
RETRY_MAX = 5.0


class RecordWriter(Protocol):
    def seal(self, prev: bytes, blocks: Sequence[BlockFields],
             timestamp: int | None = None) -> SealedRecord: ...


class Batch:
    """Blocks handed to the flusher together: one aggregation."""

    __slots__ = ("blocks", "epoch", "record", "pieces", "cut_at")

    def __init__(self, blocks: Sequence[BlockFields], epoch: int) -> None:
        self.blocks = blocks
        self.epoch = epoch
        self.record: SealedRecord | None = None
        self.pieces: list[bytes] = []
        self.cut_at = time.monotonic()  # for the cut-to-stored latency


class Flusher:
    def __init__(self, vdisk_id: str, pool: StoragePool, writer: RecordWriter, prev: bytes,
                 on_stored: Callable[[list[Batch]], None],
                 on_failed: Callable[[list[Batch], Exception], None],
                 stats: ServerStats | None = None) -> None:
        self.vdisk_id = vdisk_id
        self.stats = stats if stats is not None else ServerStats()
        self.log = ContextLogger(log, vdisk=vdisk_id)
        self.pool = pool
        self.prev = prev
        self._writer = writer
        self._coder = ErasureCoder(pool.k, pool.m)
        self._list_key = last_hash_key(vdisk_id)
        self._on_stored = on_stored
        self._on_failed = on_failed
        self._queue: deque[Batch] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._inflight: list[Batch] = []  # sealed, not yet stored
        self.failing = False
        self.stored_rounds = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name=f"flusher {self.vdisk_id}")

    def submit(self, blocks: Sequence[BlockFields], epoch: int) -> None:
        self._queue.append(Batch(blocks, epoch))
        self._idle.clear()
        self._wake.set()

    @property
    def idle(self) -> bool:
        """Nothing queued or being stored (already true inside the on_stored callback)."""
        return not self._queue and not self._inflight

    @property
    def queued_blocks(self) -> int:
        return sum(len(b.blocks) for b in self._queue)

    @property
    def pending_blocks(self) -> int:
        """Blocks handed over and not stored yet (queued or in the current round)."""
        return self.queued_blocks + sum(len(b.blocks) for b in self._inflight)

    @property
    def oldest_cut(self) -> float | None:
        """`time.monotonic` at which the oldest batch not stored yet was handed over."""
        if self._inflight:
            return self._inflight[0].cut_at
        return self._queue[0].cut_at if self._queue else None

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        sealed = self._inflight
        delay = RETRY_MIN
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue or sealed:
                try:
                    while self._queue and len(sealed) < MAX_ROUND:
                        self._seal(self._queue[0])
                        sealed.append(self._queue.popleft())
                    await self._store(sealed)
                except Exception as exc:  # storage down, or a bug: never lose the batches
                    if not isinstance(exc, StorageError):
                        self.log.exception("unexpected error while flushing")
                    self.failing = True
                    self.log.warning("storing %d aggregation(s) failed, retrying in %.2fs: %s",
                                     len(sealed), delay, exc)
                    self.stats.flush_failed_blocks += sum(len(b.blocks) for b in sealed)
                    self._on_failed(sealed, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                if self.failing:
                    self.log.info("storage is back, stored %d pending aggregation(s)",
                                  len(sealed))
                self.failing = False
                delay = RETRY_MIN
                done = sealed[:]
                sealed.clear()
                self.stored_rounds += 1
                self._count_stored(done)
                self._on_stored(done)
            self._idle.set()

    def _seal(self, batch: Batch) -> None:
        record = self._writer.seal(self.prev, batch.blocks, time.time_ns())
        batch.record = record
        batch.pieces = self._coder.encode(record.record)
        self.prev = record.hash

    def _count_stored(self, done: list[Batch]) -> None:
        stats = self.stats
        now = time.monotonic()
        for batch in done:
            stats.flushed_blocks += len(batch.blocks)
            if batch.record is not None:
                stats.flushed_bytes += len(batch.record.record)
            stats.flush_latency.observe(now - batch.cut_at)
        stats.aggregations_stored += len(done)

    async def _store(self, batches: list[Batch]) -> None:
        hashes = [b.record.hash for b in batches if b.record is not None]
        calls = []
        servers = self.pool.servers
        for i, server in enumerate(servers):
            items = [(h, b.pieces[i]) for h, b in zip(hashes, batches, strict=True)]
            calls.append(server.store(items, self._list_key, hashes))
        started = time.perf_counter()
        results = await asyncio.gather(*calls, return_exceptions=True)
        elapsed = time.perf_counter() - started
        errors = [r for r in results if isinstance(r, BaseException)]
        for server, result in zip(servers, results, strict=True):
            if isinstance(result, BaseException):
                self.stats.storage_failed(server.address, len(batches))
        if not errors:
            self.stats.flush_round.observe(elapsed)
            return
        for err in errors:
            if not isinstance(err, StorageError):
                raise StorageError(f"unexpected storage failure: {err!r}") from err
        if len(errors) == 1:
            raise errors[0]
        # Name every failed server in the one warning the round gets.
        raise StorageError(f"{len(errors)} of {len(servers)} storage servers failed: "
                           + "; ".join(str(e) for e in errors)) from errors[0]
