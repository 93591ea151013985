"""The flusher of one vdisk: seal, erasure-code and store aggregations, in order.

It owns the chain: each aggregation's ``prev`` is the hash of the one before.
Batches handed over while a storage round is in flight are sealed and stored
together in the next round (one pipelined request per server), so a busy vdisk
pays one round trip for many aggregations.

A round succeeds when at least ``min_pieces`` servers (k + 1 by default, at most
k + m) stored their piece of every aggregation and the last-hash update: with
fewer servers than k + m the vdisk goes on **degraded**, and the pieces that did
not land are recorded on the servers that did (a marker key per aggregation, see
`tlog.repair`) for ``tlog repair`` to rebuild. A server still busy with an
earlier round, or slower than the others by more than `STRAGGLER_WAIT` once
enough have answered, counts as missing for the round: one hung server neither
stalls every flush nor piles up requests.

A failed round (too few servers) answers FlushFailed and is retried with capped
backoff with the same sealed records, so the vdisk recovers by itself when
storage comes back. Two exceptions stop the retries, because carrying on could
fork the chain (two servers writing children of the same record) once storage
returns, while giving up loses nothing acknowledged (no FlushOK was sent for the
dropped blocks; the client still holds them and resends them wherever it
reconnects):

- no client is connected to the vdisk any more when a retry is due: the client
  moved on (possibly to another tlogserver);
- before a retry, a server's newest last-hash entry turns out to be a record
  that descends from this flusher's chain but was not written by it: another
  tlogserver has taken the vdisk over.

Every store is a **compare-and-set** on the server's last-hash list: it lands only if the
list's head is the one this flusher last saw there (read when the vdisk was opened, then
what it pushed). Two writers extending the same head cannot both get a round through, as
long as ``2 * min_pieces > k + m`` (each server takes one of them): a second tlogserver that
still believes it owns the vdisk has its round refused and gives up, instead of forking
the chain. A refusal naming one of our own records (a round that landed late, after it was
counted as missing) or an empty list (the server lost its data) is continued from at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from tlog.protocol.wire import BlockFields
from tlog.record.aggregation import (
    SEAL_STEP,
    RecordError,
    SealedRecord,
    is_v2_layout,
    parse_v2_header,
)
from tlog.record.erasure import ErasureCoder
from tlog.record.pieces import DecodeError, fetch_record
from tlog.record.steps import Steps, run_stepped
from tlog.storage import (
    HeadMoved,
    ScriptMissing,
    StorageError,
    StoragePool,
    StorageServer,
    Value,
    last_hash_key,
)
from tlog.storage.keys import marker_key, marker_value

from .logs import ContextLogger
from .stats import ServerStats
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

#: Most aggregations stored in one round; bounds the size of one pipeline.
MAX_ROUND = 64
#: Bytes of records after which a round takes no more aggregations: each server's request
#: is packed into one buffer on the event loop, and packing 64 aggregations of 1 MB
#: (flush-size 250 of 4 KiB blocks) or a few of 16 MB takes milliseconds per server.
#: Aggregations of flush-size 25 (100 KB) fill whole rounds under it.
MAX_ROUND_BYTES = 8 * 1024 * 1024
#: Seconds of sealing small aggregations for a round between two turns of the event loop.
SEAL_TURN_SECONDS = 0.002
RETRY_MIN = 0.05
RETRY_MAX = 5.0
#: Pieces beyond k a round needs by default (k + 1: an acknowledged record survives the
#: loss of one more server before it is repaired).
DEFAULT_EXTRA_PIECES = 1
#: Once enough servers stored a round, how long the others may still take before their
#: pieces are recorded as missing.
STRAGGLER_WAIT = 1.0
#: Hashes of our own records remembered to tell them from another server's.
KNOWN_HASHES = 4096
#: How far back from a foreign head the fork check looks for one of our records.
FORK_WALK = 64
#: Bound on the reads of the fork check (it runs only before a retry).
FORK_CHECK_TIMEOUT = 5.0


class RecordWriter(Protocol):
    def seal(self, prev: bytes, blocks: Sequence[BlockFields],
             timestamp: int | None = None, epoch: int = 0) -> SealedRecord: ...

    def seal_in_steps(self, prev: bytes, blocks: Sequence[BlockFields],
                      timestamp: int | None = None, epoch: int = 0) -> Steps[SealedRecord]: ...


class Batch:
    """Blocks handed to the flusher together: one aggregation of the vdisk's ``epoch``."""

    __slots__ = ("blocks", "epoch", "record", "pieces", "cut_at", "prev")

    def __init__(self, blocks: Sequence[BlockFields], epoch: int) -> None:
        self.blocks = blocks
        self.epoch = epoch
        self.record: SealedRecord | None = None
        self.pieces: list[bytes | memoryview] = []
        self.cut_at = time.monotonic()  # for the cut-to-stored latency
        self.prev = b""  # the hash the record chains to, once sealed


class FlushListener(Protocol):
    """What a flusher reports to, and asks of, the vdisk it stores for (given at
    construction)."""

    def on_stored(self, batches: list[Batch]) -> None:
        """A round stored ``batches`` (in chain order)."""

    def on_failed(self, batches: list[Batch], exc: Exception) -> None:
        """A round of ``batches`` failed; it is retried after a backoff."""

    def keep_retrying(self) -> bool:
        """Whether a failing round may still be retried (a client is connected)."""

    def abandon(self, reason: str, dropped: int) -> None:
        """The flusher gave up (see the module doc); ``dropped`` blocks were not stored."""


#: Told of every stored round before the listener, e.g. the standby sync, the retention
#: keeper's measure of the log.
StoredObserver = Callable[[list[Batch]], None]


class RoundFailed(StorageError):
    """Fewer than ``min_pieces`` servers stored a round; names the ones that did not."""


def _reset_unless_done(request: asyncio.Future[None], server: StorageServer) -> None:
    if not request.done():
        server.reset(f"no answer within {server.timeout:g} s")


def _summary(errors: dict[int, str], addresses: Sequence[str]) -> str:
    return "; ".join(f"{addresses[i]}: {errors[i]}" for i in sorted(errors))


class Flusher:
    """Seals, encodes and stores one vdisk's batches in order; see the module doc."""

    def __init__(self, vdisk_id: str, pool: StoragePool, writer: RecordWriter, prev: bytes,
                 listener: FlushListener, stats: ServerStats | None = None, *,
                 observers: Sequence[StoredObserver] = (), min_pieces: int | None = None,
                 straggler_wait: float | None = None,
                 server_heads: Sequence[bytes | None] | None = None) -> None:
        n = pool.k + pool.m
        if min_pieces is None:
            min_pieces = min(pool.k + DEFAULT_EXTRA_PIECES, n)
        if not pool.k <= min_pieces <= n:
            raise ValueError(f"min_pieces must be between k={pool.k} and k+m={n}, "
                             f"got {min_pieces}")
        self.vdisk_id = vdisk_id
        self.stats = stats if stats is not None else ServerStats()
        self.log = ContextLogger(log, vdisk=vdisk_id)
        self.pool = pool
        self.prev = prev
        #: The hash of the newest aggregation stored (``prev`` is the newest sealed one).
        self.stored_head = prev
        self.min_pieces = min_pieces
        self.straggler_wait = STRAGGLER_WAIT if straggler_wait is None else straggler_wait
        self._writer = writer
        self._coder = ErasureCoder(pool.k, pool.m)
        self._list_key = last_hash_key(vdisk_id)
        self._listener = listener
        self._observers = tuple(observers)
        self._queue: deque[Batch] = deque()
        self._wake = asyncio.Event()
        self._retry = asyncio.Event()  # cuts the backoff before a retry short
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._inflight: list[Batch] = []  # sealed, not yet stored
        # Per server: a request of an earlier round still running (a straggler).
        self._outstanding: dict[int, asyncio.Future[None]] = {}
        #: Servers that missed the last round: their pieces are recorded up front next time.
        self.missing_servers: frozenset[int] = frozenset()
        # Our records (and the head we continued from), newest last, for the fork check.
        self._known: deque[bytes] = deque(maxlen=KNOWN_HASHES)
        self._known_set: set[bytes] = set()
        self._remember(prev)
        self._not_forks: set[bytes] = set()
        #: Per server, the head its last-hash list has as far as we know (b"": no list),
        #: which the next store compares against; None: not known, the store is plain.
        self.server_heads: list[bytes | None] = (
            list(server_heads) if server_heads is not None else [None] * n)
        #: A head another writer put on a server's list, seen by a refused store.
        self.foreign_head: bytes | None = None
        self.failing = False
        self.abandoned = False
        self.stored_rounds = 0
        self.degraded_rounds = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name=f"flusher {self.vdisk_id}")

    def submit(self, blocks: Sequence[BlockFields], epoch: int) -> None:
        if self.abandoned:
            return  # the vdisk is being retired: nothing more is stored by this flusher
        self._queue.append(Batch(blocks, epoch))
        self._idle.clear()
        self._wake.set()

    def discard(self) -> int:
        """The vdisk was given up from outside (ownership lost): store nothing more. The
        queued batches are dropped; a round already sent runs to its end, but nothing
        starts after it. Returns the blocks dropped."""
        dropped = self.queued_blocks
        self.abandoned = True
        self._queue.clear()
        return dropped

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

    def pending_block(self, sequence: int) -> BlockFields | None:
        """The block of ``sequence`` handed over and not stored yet, if there is one."""
        for batch in itertools.chain(self._inflight, self._queue):
            blocks = batch.blocks
            if blocks and blocks[0].sequence <= sequence <= blocks[-1].sequence:
                found = blocks[sequence - blocks[0].sequence]  # a batch is consecutive
                if found.sequence == sequence:
                    return found
                return next((b for b in blocks if b.sequence == sequence), None)
        return None

    @property
    def oldest_cut(self) -> float | None:
        """`time.monotonic` at which the oldest batch not stored yet was handed over."""
        if self._inflight:
            return self._inflight[0].cut_at
        return self._queue[0].cut_at if self._queue else None

    def retry_now(self) -> None:
        """Retry a failing round at once instead of at the end of its backoff (a client
        came back: it should learn soon whether storage works again)."""
        if self.failing:
            self._retry.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def wait_stopped(self) -> None:
        """Until the flusher's task has ended (it was stopped, or it gave up)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        for task in self._outstanding.values():
            task.cancel()
        self._outstanding.clear()
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        sealed = self._inflight
        delay = RETRY_MIN
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue or sealed:
                try:
                    size = sum(len(b.record.record) for b in sealed if b.record is not None)
                    turn = time.perf_counter()
                    # What is queued now: batches handed over while it is sealed (the loop
                    # runs between seals) wait for the next round, not delay this one.
                    limit = min(MAX_ROUND, len(sealed) + len(self._queue))
                    while self._queue and len(sealed) < limit and size < MAX_ROUND_BYTES:
                        batch = self._queue[0]
                        await self._seal(batch)
                        if not self._queue or self._queue[0] is not batch:
                            break  # discarded while it was being sealed
                        sealed.append(self._queue.popleft())
                        size += len(batch.record.record) if batch.record is not None else 0
                        if time.perf_counter() - turn > SEAL_TURN_SECONDS:
                            # A round of 64 small aggregations is sealed in 30 ms and more:
                            # not in one go, while the clients' reads wait.
                            await asyncio.sleep(0)
                            turn = time.perf_counter()
                    if self.abandoned:  # discarded between two seals
                        sealed.clear()
                        break
                    if not sealed:
                        continue
                    await self._store(sealed)
                except Exception as exc:  # storage down, or a bug: never lose the batches
                    if self.abandoned:  # discarded: nothing is retried
                        sealed.clear()
                        break
                    if not isinstance(exc, StorageError):
                        self.log.exception("unexpected error while flushing")
                    self.failing = True
                    self.log.warning("storing %d aggregation(s) failed, retrying in %.2fs: %s",
                                     len(sealed), delay, exc)
                    self.stats.flush_failed_blocks += sum(len(b.blocks) for b in sealed)
                    self._listener.on_failed(sealed, exc)
                    self._retry.clear()
                    try:  # (asyncio.timeout: 3.11's wait_for may swallow a cancellation)
                        async with asyncio.timeout(delay):
                            await self._retry.wait()
                    except TimeoutError:
                        pass
                    delay = min(delay * 2, RETRY_MAX)
                    if self.abandoned:  # discarded during the wait
                        sealed.clear()
                        break
                    reason = await self._why_give_up()
                    if reason is not None:
                        self._abandon(reason)
                        return
                    continue
                if self.failing:
                    self.log.info("storage is back, stored %d pending aggregation(s)",
                                  len(sealed))
                self.failing = False
                delay = RETRY_MIN
                done = sealed[:]
                sealed.clear()
                self.stored_rounds += 1
                last = done[-1].record
                if last is not None:
                    self.stored_head = last.hash
                self._count_stored(done)
                for observe in self._observers:
                    observe(done)
                self._listener.on_stored(done)
            self._idle.set()

    # -- giving up instead of forking --

    async def _why_give_up(self) -> str | None:
        """Before a retry: a reason to stop retrying (see the module doc), else None."""
        if not self._listener.keep_retrying():
            return "storage failing and no client connected any more"
        if self.foreign_head is not None:
            return (f"another writer moved the chain head to {self.foreign_head.hex()[:16]} "
                    "(a store compared the head and was refused)")
        try:
            async with asyncio.timeout(FORK_CHECK_TIMEOUT):
                foreign = await self._foreign_head()
        except TimeoutError:
            return None
        if foreign is not None:
            return (f"another writer stored aggregation {foreign.hex()[:16]} on top of this "
                    "server's chain")
        return None

    def _abandon(self, reason: str) -> None:
        dropped = self.pending_blocks
        self.abandoned = True
        self._queue.clear()
        self._inflight.clear()
        for task in self._outstanding.values():
            task.cancel()
        self._outstanding.clear()
        self.failing = False
        self._idle.set()
        self.log.error("giving up on the vdisk: %s; %d unacknowledged block(s) dropped (no "
                       "FlushOK was sent for them: clients resend them)", reason, dropped)
        self._listener.abandon(reason, dropped)

    def _remember(self, key: bytes) -> None:
        if len(self._known) == self._known.maxlen:
            self._known_set.discard(self._known[0])
        self._known.append(key)
        self._known_set.add(key)

    async def _foreign_head(self) -> bytes | None:
        """A server's newest last-hash entry that descends from one of our records without
        being ours, None when there is none (or it cannot be read)."""
        async def heads(index: int) -> bytes | None:
            try:
                entries = await self.pool.servers[index].list_range(self._list_key)
            except StorageError:
                return None
            return entries[0] if entries else None

        found = await asyncio.gather(*(heads(i) for i in range(len(self.pool.servers))))
        for head in dict.fromkeys(h for h in found if h is not None):
            if head in self._known_set or head in self._not_forks:
                continue
            if await self._descends_from_ours(head):
                return head
            if len(self._not_forks) > KNOWN_HASHES:
                self._not_forks.clear()
            self._not_forks.add(head)
        return None

    async def _descends_from_ours(self, key: bytes) -> bool:
        """Whether following ``prev`` from ``key`` reaches one of our records within
        `FORK_WALK` steps. Only v2 and v3 records can be followed without the key; an unreadable
        record (fewer than k pieces) counts as no descendant: it can never be a head."""
        for _ in range(FORK_WALK):
            try:
                record = (await fetch_record(self.pool, key, self._coder)).record
                if not is_v2_layout(record):
                    return False
                prev = parse_v2_header(record).prev
            except (DecodeError, RecordError):
                return False
            if prev in self._known_set:
                return True
            key = prev
        return False

    # -- sealing and storing --

    async def _seal(self, batch: Batch) -> None:
        """Seal and erasure-code ``batch``. A large aggregation is sealed and coded in
        steps, the biggest single calls of its sealing in a thread (`tlog.record.steps`),
        so that the event loop keeps answering reads meanwhile; a small one in one go, as
        that costs less."""
        blocks = batch.blocks
        size = len(blocks) * max(len(blocks[0].data), len(blocks[-1].data))  # (cheap)
        if size <= SEAL_STEP:  # small: in one go
            record = self._writer.seal(self.prev, blocks, time.time_ns(), batch.epoch)
            batch.pieces = self._coder.encode_views(record.record)
        else:
            record = await run_stepped(self._writer.seal_in_steps(
                self.prev, blocks, time.time_ns(), batch.epoch))
            batch.pieces = await run_stepped(self._coder.encode_in_steps(record.record))
        batch.record = record
        batch.prev = self.prev
        self.prev = record.hash
        self._remember(record.hash)

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
        """One round: every server its pieces, markers and last-hash update, in one pipeline.

        Returns once ``min_pieces`` servers stored everything and the missing pieces are
        recorded; raises `RoundFailed` (a StorageError) when too few servers stored it.
        """
        hashes = [b.record.hash for b in batches if b.record is not None]
        self.foreign_head = None
        servers = self.pool.servers
        addresses = [s.address for s in servers]
        errors: dict[int, str] = {}
        for i, task in list(self._outstanding.items()):
            if task.done():
                del self._outstanding[i]
            else:
                errors[i] = "still busy with an earlier round"
        # Pieces that will not land on servers known to be down are recorded with the
        # pieces themselves (same MSET): the usual degraded round costs one round trip.
        expected = sorted(set(self.missing_servers) | set(errors))
        markers = ([(marker_key(self.vdisk_id, h), marker_value(expected)) for h in hashes]
                   if expected else [])
        loop = asyncio.get_running_loop()
        tasks: dict[asyncio.Future[None], int] = {}
        requests: dict[int, list[tuple[bytes, Value]]] = {}
        # Big pieces: let the loop run between servers (each write copies them).
        big = sum(len(b.pieces[0]) for b in batches if b.pieces) > SEAL_STEP
        for i, server in enumerate(servers):
            if i in errors:
                continue
            if big and tasks:
                await asyncio.sleep(0)
            items = [(h, b.pieces[i]) for h, b in zip(hashes, batches, strict=True)]
            if i not in expected:  # a server expected to miss the round needs no marker
                items += markers
            requests[i] = items
            # Written at once when the server's connection is up (no task per server: the
            # common case); otherwise, or to retry, as a task that connects first.
            head = self.server_heads[i]
            started_now = (server.store_soon(items, self._list_key, hashes, head)
                           if head is not None else None)
            tasks[started_now if started_now is not None else loop.create_task(
                self._store_on(i, server, items, hashes))] = i
        started = time.perf_counter()
        ok = await self._wait_round(tasks, errors, requests, hashes)
        elapsed = time.perf_counter() - started
        for i in ok:
            self.server_heads[i] = hashes[-1]
        missing = sorted(errors)
        self.missing_servers = frozenset(missing)
        for i in missing:
            self.stats.storage_failed(addresses[i], len(batches))
        if len(ok) < self.min_pieces:
            raise RoundFailed(f"{len(ok)} of {len(servers)} storage servers stored the round, "
                              f"{self.min_pieces} needed: {_summary(errors, addresses)}")
        self.stats.flush_round.observe(elapsed)
        if not missing:
            if self.degraded_rounds:
                self.log.info("every storage server stores again")
                self.degraded_rounds = 0
            return
        if not self.degraded_rounds:
            self.log.warning("storing degraded on %d of %d servers, the missing pieces are "
                             "recorded for `tlog repair`: %s", len(ok), len(servers),
                             _summary(errors, addresses))
        self.degraded_rounds += 1
        if set(missing) - set(expected):
            await self._record_missing(hashes, missing, ok)

    async def _wait_round(self, tasks: dict[asyncio.Future[None], int], errors: dict[int, str],
                          requests: dict[int, list[tuple[bytes, Value]]],
                          hashes: list[bytes]) -> list[int]:
        """Wait for the round's requests; the servers that stored it. Failed and straggling
        servers go into ``errors``; stragglers keep running in `_outstanding`.

        A request written at once (`StorageServer.store_soon`) that needs another try (the
        script was not cached; our own head moved under it) is tried again as a task. All
        are bounded by the servers' timeout; once the outcome is known (``min_pieces``
        stored it, or too many failed for it to succeed), the others get `straggler_wait`
        more seconds.
        """
        loop = asyncio.get_running_loop()
        servers = self.pool.servers
        ok: list[int] = []
        pending = set(tasks)
        deadline = loop.time() + max(s.timeout for s in servers) + 1.0
        outcome_known = False
        while pending:
            done, pending = await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()),
                                               return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = tasks[task]
                exc = task.exception()
                if exc is None:
                    ok.append(i)
                elif not isinstance(task, asyncio.Task) and (
                        isinstance(exc, ScriptMissing) or (isinstance(exc, HeadMoved) and (
                            exc.head == b"" or exc.head in self._known_set))):
                    retry = loop.create_task(self._store_on(i, servers[i], requests[i], hashes))
                    tasks[retry] = i
                    pending.add(retry)
                elif isinstance(exc, HeadMoved):
                    errors[i] = self._head_moved(exc)
                elif isinstance(exc, StorageError):
                    errors[i] = str(exc)
                else:
                    errors[i] = f"unexpected storage failure: {exc!r}"
            if not outcome_known and (len(ok) >= self.min_pieces
                                      or len(ok) + len(pending) < self.min_pieces):
                outcome_known = True
                deadline = min(deadline, loop.time() + self.straggler_wait)
            if not done:
                break  # the stragglers' time is up
        for task in pending:
            i = tasks[task]
            if outcome_known:
                errors[i] = f"no answer within {self.straggler_wait:g} s of the others"
            else:
                errors[i] = f"no answer within {servers[i].timeout:g} s"
            if not isinstance(task, asyncio.Task):
                # Nothing else bounds a request written at once: its server's timeout.
                if outcome_known:
                    loop.call_later(servers[i].timeout, _reset_unless_done, task, servers[i])
                else:
                    servers[i].reset(errors[i])
            task.add_done_callback(_retrieve)
            self._outstanding[i] = task
        return sorted(ok)

    async def _store_on(self, index: int, server: StorageServer,
                        items: list[tuple[bytes, Value]], hashes: list[bytes]) -> None:
        """One server's part of a round, compared against the head we know it has. A head
        of ours we did not expect (a round that landed after it was counted missing) or no
        list at all (the server lost its data) is continued from at once; another writer's
        head raises `HeadMoved`."""
        try:
            await server.store(items, self._list_key, hashes,
                               expect_head=self.server_heads[index])
        except HeadMoved as exc:
            if exc.head != b"" and exc.head not in self._known_set:
                raise
            await server.store(items, self._list_key, hashes, expect_head=exc.head)

    def _head_moved(self, exc: HeadMoved) -> str:
        """A refused compare-and-set: another writer's head, remembered for the give-up."""
        self.foreign_head = exc.head
        return str(exc)

    async def _record_missing(self, hashes: list[bytes], missing: list[int],
                              ok: list[int]) -> None:
        """Record pieces that failed unexpectedly on the servers that stored the round."""
        markers = [(marker_key(self.vdisk_id, h), marker_value(missing)) for h in hashes]
        servers = self.pool.servers
        results = await asyncio.gather(*(servers[i].set_many(markers) for i in ok),
                                       return_exceptions=True)
        if all(isinstance(r, BaseException) for r in results):
            # Stored all the same; `tlog repair` finds the pieces by scanning the chain.
            self.log.warning("could not record the missing pieces of %d aggregation(s): %s",
                             len(hashes), results[0])


def _retrieve(task: asyncio.Future[None]) -> None:
    """Mark a straggler's outcome as seen (it was counted as missing already)."""
    if not task.cancelled():
        task.exception()
