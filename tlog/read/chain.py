"""Reading a vdisk's log back from its storage pool, checking everything on the way.

A vdisk's log is a chain of aggregations: each names the hash of the one before it
(``prev``), the first one names 32 zero bytes, and the servers' ``last_hash_<vdisk>`` lists
point at the newest. Reading it back takes two passes, because the chain can only be
entered at its head:

1. **Walk back** from the head (`find_last`'s rule: per server, the first entry of its
   last-hash list that decodes; among servers, the one whose aggregation ends with the
   highest sequence) along ``prev`` to the zero hash, or to the aggregation where a
   limiter says older ones cannot matter. A v2 or v3 record's plaintext header holds ``prev``
   and the sequence range, so for those this pass reads piece 0's header alone and decrypts
   nothing; storage server 0 follows the chain itself for up to `MAX_HEADER_RUN` records
   per round trip (`PieceReader.header_run`), the walk asks piece by piece where it cannot. Such a
   header is only believed for the walk: one that leads to no stored record, or
   that the walk would stop on, is read whole and hash-checked first. A legacy record
   must be fetched whole (hash = key) and decrypted to learn its ``prev``. What was read
   is kept for the second pass within a memory budget; beyond it only the hashes are
   kept and the records are read again.
2. **Replay forward**, oldest first: fetch each record not kept (a few batches ahead,
   one MGET per data server per batch), check that it hashes to its key (BLAKE3 for a v3
   record, BLAKE2b for the others: a chain may hold both), open it (AES-GCM
   tag, which covers the v2 header), check that its sealed ``prev`` is the link the walk
   followed, that it belongs to the vdisk and that every block's BLAKE2b matches its
   data (in worker processes, `tlog.read.bulkread`, or worker threads, while the caller
   applies the previous aggregation); then select the blocks a limiter lets through,
   skipping sequences already replayed.

Pieces (`tlog.record.pieces`) and limiters (`tlog.read.limiter`) are described where they are
implemented; checkpoints in `tlog.read.checkpoints`.

Duplicates and epochs: a server that crashes after storing an aggregation but before the
client saw its FlushOK may store the same sequences again when the client resends them
(0-Disk's server does). Both copies carry the same write, and replaying the older copy again
after newer writes would undo them, so within an epoch a sequence is replayed once: its
first occurrence in chain order. A client that numbers again from 0 gets a new epoch from
the server, and a later epoch's blocks are replayed over everything before them (see
docs/durability.md). Verification of re-flushed copies and reused sequences is in
`tlog.read.verify`; fetching records in `tlog.record.pieces` and `tlog.read.fetch`, the
head in `tlog.read.head`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures.process
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any, TypeVar

from tlog.record.aggregation import (
    ZERO_HASH,
    Aggregation,
    RecordError,
    RecordOpener,
    V2Header,
    check_blocks,
    is_v2_layout,
    parse_v2_header,
)
from tlog.record.erasure import ErasureCoder, ErasureError
from tlog.record.pieces import DecodeError, Fetched, PieceReader, piece_header
from tlog.storage import StoragePool

from .bulkread import WorkerPool, usable_addresses
from .checkpoints import (
    CheckpointRef,
    before_window,
    check_part,
    explain_missing,
    find_checkpoints,
)
from .fetch import (
    FIRST_HEADER_RUN,
    HEADER_STEP,
    MAX_HEADER_RUN,
    SCRIPT_MISSES,
    open_checked,
    open_fetched,
)
from .head import Head, find_head
from .limiter import Limiter, Replayed, SequenceSet
from .links import BATCH, ChainItem, ChainLink, cut_batches

log = logging.getLogger(__name__)

#: Bytes of fetched records or opened aggregations kept between the walk back and the
#: replay. Beyond it the oldest part of the chain is read a second time instead.
DEFAULT_CACHE_BYTES = 512 * 1024 * 1024
#: Records fetched ahead of the one being replayed (about 13 MB of 25-block records; fewer
#: when the aggregations are larger, see `BATCH_BYTES`).
DEFAULT_PREFETCH = 128
#: Links a replay needs before worker processes are forked for it (fewer are read quicker
#: than the processes start).
MIN_PROCESS_LINKS = 64
#: Threads that check and open records while the event loop fetches and applies: one per
#: core, since hashing (most of the work: every record and every block) and decompression
#: run outside the GIL. AES-GCM and parsing hold it, so more would not help.
DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))

T = TypeVar("T")


#: One record of a batch for `ChainReader._open_many`: its link, and the opened aggregation,
#: the record or the k data pieces, whichever is at hand (all None: fetch it first).
_Job = tuple[ChainLink, Aggregation | None, bytes | None, list[bytes] | None]


class ChainReader:
    """Reads a vdisk's chain: `walk` back from the head, then iterate `items` oldest first.

    ``opener`` decides the record format (ours, legacy or auto) and how a record is checked
    against its key. ``cache_bytes`` bounds what
    the walk keeps for the replay; ``prefetch`` bounds the records fetched ahead.
    ``workers`` threads check and open records while the caller applies the previous ones
    (hashing and decompression run outside the GIL); 0 opens them in the event loop's thread.
    ``all_pieces`` fetches and checks every piece, parity included (slower; for verify).
    ``processes``: open the records of a long replay in ``workers`` forked processes
    (`tlog.read.bulkread`) instead of threads; None (the default) does when there are two
    workers or more, the storage servers are Redis servers (TLS or not) and fork is available.
    ``timeout``: seconds to wait for a storage server in the workers and the walk script.
    ``head_key``: walk back from this aggregation instead of the chain's head (to replay
    the state at an older point, as `tlog compact` does). ``block_hashes=False`` leaves out
    the BLAKE2b check of each block of a v2 or v3 record: its AES-GCM tag already proves the
    record holds exactly what tlogserver sealed, after it checked every block's hash on
    receipt (legacy records, whose static nonce makes the tag forgeable, are always
    checked).

    Checkpoints: the walk stops at the newest checkpoint it meets whose point the bounds
    allow, and the replay starts with its parts (`ChainItem.checkpoint`); a read whose
    bounds lie before every checkpoint, once the aggregations before them are gone, fails
    with `RetentionError` naming the oldest restorable point.
    """

    def __init__(self, pool: StoragePool, vdisk_id: str, opener: RecordOpener,
                 limiter: Limiter | None = None, *, coder: ErasureCoder | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, prefetch: int = DEFAULT_PREFETCH,
                 workers: int = DEFAULT_WORKERS, all_pieces: bool = False,
                 on_walk: Callable[[int], None] | None = None,
                 processes: bool | None = None, timeout: float = 10.0,
                 head_key: bytes | None = None, block_hashes: bool = True) -> None:
        self.pool = pool
        self.vdisk_id = vdisk_id
        self.opener = opener
        self.limiter = limiter or Limiter()
        self.cache_bytes = cache_bytes
        self.prefetch = max(1, prefetch)
        self.workers = max(0, workers)
        self.all_pieces = all_pieces
        self.block_hashes = block_hashes
        self.on_walk = on_walk
        self.coder = coder or ErasureCoder(pool.k, pool.m)
        self.processes = processes
        self.timeout = timeout
        self.head_key = head_key
        self._reader = PieceReader(pool, self.coder, timeout, opener.key_matches)
        self._procs: WorkerPool | None = None
        # key -> its v2 header and length as server 0 read them (`_read_ahead`); None: not
        # a v2 header
        self._ahead: dict[bytes, tuple[V2Header, int] | None] = {}
        self._run_size = FIRST_HEADER_RUN
        self._script_misses = 0  # script runs in a row that found no header
        self._cached = 0
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.links: list[ChainLink] = []  # oldest first, after walk()
        self.head: Head | None = None
        self.walked = False
        self._replayed = Replayed()
        self.checkpoints: list[CheckpointRef] = []  # registered ones, newest first
        self.base: CheckpointRef | None = None  # the one the replay starts from

    @property
    def epoch(self) -> int:
        """The epoch of the aggregation replayed last (with `applied`, its sequences)."""
        return self._replayed.epoch

    @property
    def applied(self) -> SequenceSet:
        """The sequences replayed so far in the current epoch."""
        return self._replayed.applied

    async def fetch(self, key: bytes) -> Fetched:
        """One record by its hash, read from the pool as the walk reads them."""
        return await self._reader.fetch(key)

    @property
    def down_servers(self) -> list[int]:
        """Servers that failed during this read."""
        return sorted(self._reader.down)

    @property
    def total_blocks(self) -> int:
        """Blocks in the aggregations the walk found (before limits and duplicates)."""
        return sum(link.count for link in self.links)

    def _keep(self, link: ChainLink) -> None:
        """Drop what the walk fetched once over the memory budget (read again later)."""
        size = link.cached_bytes
        if self._cached + size > self.cache_bytes:
            link.drop()
        else:
            self._cached += size

    def _link_from_agg(self, agg: Aggregation, fetched: Fetched | None) -> ChainLink:
        first, last = agg.first_sequence, agg.last_sequence
        if agg.checkpoint is not None and fetched is not None:
            head = parse_v2_header(fetched.record)  # a checkpoint's range is in its header
            first, last = head.first_sequence, head.last_sequence
        return ChainLink(agg.hash, agg.prev, first, last, len(agg.blocks), agg.timestamp,
                         agg=agg, missing=fetched.missing if fetched else [],
                         corrupt=fetched.corrupt if fetched else [], epoch=agg.epoch,
                         checkpoint=agg.checkpoint, size=agg.record_size)

    def _check_vdisk(self, key: bytes, vdisk_id: str) -> None:
        if vdisk_id != self.vdisk_id:
            raise DecodeError(f"aggregation {key.hex()} belongs to vdisk {vdisk_id!r}, "
                              f"not {self.vdisk_id!r}", key)

    @property
    def _headers_suffice(self) -> bool:
        """Whether the walk can go by v2 headers (no block timestamps needed)."""
        return self.opener.format != "legacy" and not self.limiter.needs_block_times

    def _make_link(self, key: bytes, fetched: Fetched) -> ChainLink:
        """A verified link from a fetched record: by its header (v2), else opened."""
        record = fetched.record
        if self._headers_suffice and is_v2_layout(record):
            try:
                head = parse_v2_header(record)
            except RecordError as exc:
                raise DecodeError(f"aggregation {key.hex()}: {exc}", key) from None
            self._check_vdisk(key, head.vdisk_id)
            return ChainLink(key, head.prev, head.first_sequence, head.last_sequence,
                             head.count, head.timestamp, record=record,
                             missing=fetched.missing, corrupt=fetched.corrupt,
                             epoch=head.epoch, checkpoint=head.checkpoint, size=len(record))
        agg = open_checked(self.opener, record, key)
        self._check_vdisk(key, agg.vdisk_id)
        return self._link_from_agg(agg, fetched)

    async def _read_ahead(self, key: bytes) -> None:
        """Have storage server 0 read the headers of the next links from ``key`` back in
        one round trip (`PieceReader.header_run`), for `_step` to use."""
        run = await self._reader.header_run(key, self._run_size)
        if not run:
            # This record's piece 0 holds no whole v2 header: a legacy record, a tiny one,
            # a damaged or missing piece. `_step` reads it otherwise; after a few such
            # records in a row (a legacy chain goes on with legacy records) the script is
            # not worth its round trip any more.
            self._script_misses += 1
            if self._script_misses >= SCRIPT_MISSES:
                self._reader.scripting = False
            return
        self._script_misses = 0
        self._run_size = min(self._run_size * 2, MAX_HEADER_RUN)
        for i, prefix in enumerate(run, 1):
            got = piece_header(prefix)
            self._ahead[key] = got
            if got is None:
                break
            key = got[0].prev
            if not i % HEADER_STEP:
                await asyncio.sleep(0)  # (2,048 headers are 10 ms and more of parsing)

    async def _step(self, key: bytes) -> ChainLink:
        """The link of ``key``: from piece 0's v2 header when that suffices, else verified."""
        known = None
        if self._headers_suffice and not self.all_pieces:
            if key not in self._ahead and self._reader.scripting:
                await self._read_ahead(key)
            got = self._ahead.pop(key, None)
            piece = None
            if got is None:
                piece = await self._reader.first_piece(key)
                got = piece_header(piece)
            if got is not None and got[0].vdisk_id == self.vdisk_id:
                head, size = got
                return ChainLink(key, head.prev, head.first_sequence, head.last_sequence,
                                 head.count, head.timestamp, piece0=piece, verified=False,
                                 epoch=head.epoch, checkpoint=head.checkpoint, size=size)
            if piece is not None:
                known = {0: piece}  # a legacy record (auto), a tiny one, or a bad piece
        return self._make_link(key, await self._reader.fetch(key, self.all_pieces, known))

    async def _verified(self, link: ChainLink) -> ChainLink:
        """``link`` read whole and hash-checked (its header may have come from a bad piece)."""
        if link.verified:
            return link
        return self._make_link(link.key, await self._reader.fetch(link.key))

    def _stops(self, link: ChainLink) -> bool:
        oldest_ts: int | None = None
        if link.agg is not None:
            oldest_ts = min((b.timestamp for b in link.agg.blocks), default=0)
        return self.limiter.walk_stops_at(link.first_sequence, oldest_ts, link.epoch)

    async def walk(self) -> list[ChainLink]:
        """Find the head and follow ``prev`` back; returns the links, oldest first.

        Raises DecodeError naming the aggregation that cannot be read or whose ``prev`` is
        not stored. An empty list means the vdisk has no log.
        """
        if self.walked:
            return self.links
        try:
            return await self._walk()
        finally:
            self._ahead.clear()
            await self._reader.close()

    async def _walk(self) -> list[ChainLink]:
        if self.head_key is not None:
            fetched = await self._reader.fetch(self.head_key)
            agg: Aggregation | None = await open_fetched(self.opener, fetched.record,
                                                         self.head_key)
            assert agg is not None
            self._check_vdisk(self.head_key, agg.vdisk_id)
            fetched_head: Fetched | None = fetched
        else:
            head = await find_head(self.pool, self.vdisk_id, self.opener, self._reader)
            self.head = head
            agg = head.agg
            fetched_head = head.fetched.get(agg.hash) if agg is not None else None
        links: list[ChainLink] = []
        if self.limiter.epoch is None:
            # Sequence bounds name the vdisk's current numbering: the head's epoch.
            self.limiter = replace(self.limiter, epoch=agg.epoch if agg is not None else 0)
        if agg is not None:
            self.checkpoints = await find_checkpoints(self.pool, self.vdisk_id, self._reader)
            covered = {ref.covered: ref for ref in reversed(self.checkpoints)}
            refreshed = False  # the checkpoint list read again after a missing record
            passed: list[CheckpointRef] = []  # met, but before the bounds
            link = self._link_from_agg(agg, fetched_head)
            if self.all_pieces:
                fetched = await self._reader.fetch(link.key, all_pieces=True)
                link.missing, link.corrupt = fetched.missing, fetched.corrupt
            links.append(link)
            seen = {link.key}
            while True:
                if link.checkpoint is not None:
                    if link.checkpoint.part == 0:
                        break  # the first part of the base checkpoint
                elif link.prev != ZERO_HASH and self._stops(link) and not link.verified:
                    link = links[-1] = await self._verified(link)  # stop on checked facts
                if link.checkpoint is None and (link.prev == ZERO_HASH or self._stops(link)):
                    break
                key = link.prev
                ref = covered.get(key) if link.checkpoint is None else None
                if ref is not None and self.base is None and ref.usable_for(self.limiter):
                    self.base, key = ref, ref.key  # replay from the checkpoint instead
                elif ref is not None and ref not in passed:
                    passed.append(ref)
                if key in seen:
                    raise DecodeError(f"aggregation {link.key.hex()}: the chain loops back to "
                                      f"{key.hex()}", link.key)
                try:
                    nxt = await self._step(key)
                except DecodeError as exc:
                    if not link.verified:
                        # The header we followed came from piece 0 alone: check it first.
                        link = links[-1] = await self._verified(link)
                        if link.prev != key and key != getattr(self.base, "key", None):
                            continue
                    if not refreshed and link.checkpoint is None and ref is None:
                        # A compaction may have registered a checkpoint for this point and
                        # deleted what it covers since the list was read.
                        refreshed = True
                        self.checkpoints = await find_checkpoints(self.pool, self.vdisk_id,
                                                                  self._reader)
                        covered = {r.covered: r for r in reversed(self.checkpoints)}
                        if key in covered:
                            continue
                    if passed:
                        raise before_window(self.vdisk_id, self.limiter, passed[-1],
                                            exc) from None
                    raise DecodeError(
                        f"chain broken at aggregation {link.key.hex()} (sequences "
                        f"{link.first_sequence}..{link.last_sequence}): its prev {exc}",
                        link.key) from None
                check_part(link, nxt, ref if key != link.prev else None)
                seen.add(key)
                self._keep(link)
                link = nxt
                links.append(link)
                if self.on_walk is not None:
                    self.on_walk(len(links))
            self._keep(link)
        links.reverse()
        self.links = links
        self.walked = True
        return links

    # -- the replay --

    def _finish(self, link: ChainLink, agg: Aggregation) -> Aggregation:
        """Check an opened aggregation against its link; CPU only (runs in a worker)."""
        key = link.key
        if agg.checkpoint != link.checkpoint:
            raise DecodeError(f"aggregation {key.hex()}: its sealed header "
                              f"{'is' if agg.checkpoint else 'is not'} a checkpoint's, unlike "
                              "the header the walk followed", key)
        if agg.prev != link.prev:
            raise DecodeError(f"aggregation {key.hex()}: its sealed prev {agg.prev.hex()} "
                              f"differs from the link followed to it ({link.prev.hex()})",
                              key)
        self._check_vdisk(key, agg.vdisk_id)
        bad = check_blocks(agg) if self.block_hashes or agg.format == "legacy" else []
        if bad:
            shown = ", ".join(str(s) for s in bad[:5]) + (" ..." if len(bad) > 5 else "")
            raise DecodeError(f"aggregation {key.hex()}: {len(bad)} block(s) do not match "
                              f"their BLAKE2b hash (sequences {shown})", key)
        return agg

    def _open_record(self, link: ChainLink, record: bytes) -> Aggregation:
        return self._finish(link, open_checked(self.opener, record, link.key))

    def _join_and_open(self, link: ChainLink, data: list[bytes]) -> Aggregation | None:
        """The aggregation of k data pieces, None if they do not hash to the key."""
        try:
            record = self.coder.decode([*data, *([None] * self.coder.m)])
        except ErasureError:
            return None
        if not self.opener.key_matches(record, link.key):
            return None
        return self._open_record(link, record)

    async def _in_worker(self, func: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            return func(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    async def _load(self, link: ChainLink,
                    data: list[bytes | None] | None = None) -> Aggregation:
        """Fetch (when not kept from the walk), check and open one link's aggregation.

        ``data``: its k data pieces when the caller fetched them already (None = missing).
        """
        if link.agg is not None:
            agg = link.agg
            link.drop()
            return await self._in_worker(self._finish, link, agg)
        if link.record is not None:
            record = link.record
            link.drop()
            return await self._in_worker(self._open_record, link, record)
        known = {0: link.piece0} if link.piece0 is not None else None
        link.drop()
        if not self.all_pieces:
            if data is None:
                data = await self._reader.pieces(link.key, range(self.coder.k), known)
            if all(p is not None for p in data):
                pieces = [p for p in data if p is not None]
                joined: Aggregation | None = await self._in_worker(self._join_and_open, link,
                                                                    pieces)
                if joined is not None:
                    return joined
            known = {i: p for i, p in enumerate(data) if p is not None}
        fetched = await self._reader.fetch(link.key, self.all_pieces, known)
        link.missing, link.corrupt = fetched.missing, fetched.corrupt
        return await self._in_worker(self._open_record, link, fetched.record)

    def _open_many(self, jobs: list[_Job]) -> list[Aggregation | DecodeError | None]:
        """The CPU part of a batch, in one worker call (one hop to the thread and back per
        batch, not per record): join, hash-check, open and check each record; None where
        the pieces do not make the record (the caller fetches parity), a DecodeError in its
        place for a record that fails."""
        out: list[Aggregation | DecodeError | None] = []
        for link, agg, record, pieces in jobs:
            try:
                if agg is not None:
                    out.append(self._finish(link, agg))
                elif record is not None:
                    out.append(self._open_record(link, record))
                elif pieces is not None:
                    out.append(self._join_and_open(link, pieces))
                else:
                    out.append(None)
            except DecodeError as exc:
                out.append(exc)
        return out

    def _start_processes(self, links: int) -> None:
        """Fork the worker processes when they are worth it (see ``processes``)."""
        wanted = self.processes
        if wanted is None:
            wanted = self.workers >= 2 and links >= MIN_PROCESS_LINKS
        if not wanted or self.all_pieces or self.workers < 1 or not WorkerPool.available():
            return
        addresses = usable_addresses(self.pool.servers, self.coder.k)
        if addresses is None:
            return
        size = max(1, min(BATCH, self.prefetch))
        self._procs = WorkerPool(self.workers, addresses, self.coder.k, self.coder.m,
                                 self.opener, self.vdisk_id, self.timeout,
                                 slots=self.prefetch // size + 2,
                                 block_hashes=self.block_hashes)

    def _stop_processes(self) -> None:
        procs, self._procs = self._procs, None
        if procs is not None:
            procs.close()

    async def _load_batch(self, batch: list[ChainLink]) -> list[Aggregation | DecodeError]:
        """Load several links: in the worker processes when there are some, else (and for
        whatever they hand back unopened) in this process."""
        procs = self._procs
        # (checkpoint parts are opened here: their header is part of what is checked)
        need = [link for link in batch
                if link.agg is None and link.record is None and link.checkpoint is None]
        if procs is None or not need:
            return await self._load_here(batch)
        try:
            opened, error = await procs.open([(link.key, link.prev) for link in need])
        except (concurrent.futures.process.BrokenProcessPool, RuntimeError, OSError) as exc:
            log.warning("record worker processes failed (%s): reading in this process", exc)
            opened, error = [None] * len(need), None
            self._stop_processes()
        if error is not None:
            log.warning("record worker processes cannot read %s: reading in this process",
                        error)
            self._stop_processes()
        done: dict[bytes, Aggregation] = {}
        for link, result in zip(need, opened, strict=True):
            if result is not None:
                link.drop()
                done[link.key] = result
        rest = [link for link in batch if link.key not in done]
        others = iter(await self._load_here(rest) if rest else [])
        return [done[link.key] if link.key in done else next(others) for link in batch]

    async def _load_here(self, batch: list[ChainLink]) -> list[Aggregation | DecodeError]:
        """Load several links: one MGET per data server, then one worker call that checks
        and opens them all; a failure is returned in its place, so the links before it are
        still replayed. Records whose data pieces are missing or wrong take the slow path
        (`_load`: parity, every combination of pieces)."""
        data: dict[bytes, list[bytes | None]] = {}
        need = [link for link in batch if link.agg is None and link.record is None]
        if need and not self.all_pieces:
            k = self.coder.k
            for link in need:
                data[link.key] = [link.piece0] + [None] * (k - 1)
            asked = [[link for link in need if i or link.piece0 is None] for i in range(k)]
            got = await asyncio.gather(*(self._reader.many(i, [link.key for link in links])
                                         for i, links in enumerate(asked)))
            for i, (links, values) in enumerate(zip(asked, got, strict=True)):
                for link, value in zip(links, values, strict=True):
                    data[link.key][i] = value
        jobs: list[_Job] = []
        for link in batch:
            agg, record, pieces = link.agg, link.record, None
            if agg is not None or record is not None:
                link.drop()
            elif not self.all_pieces:
                found = data[link.key]
                if all(p is not None for p in found):
                    pieces = [p for p in found if p is not None]
            jobs.append((link, agg, record, pieces))
        results = await self._in_worker(self._open_many, jobs)
        done: list[Aggregation | DecodeError] = []
        for link, result in zip(batch, results, strict=True):
            if result is None:
                try:
                    result = await self._load(link, data.get(link.key))
                except DecodeError as exc:
                    result = exc
            done.append(result)
        return done

    async def items(self) -> AsyncIterator[ChainItem]:
        """Replay: every aggregation of the walk, oldest first, checked and opened.

        Raises DecodeError at the first aggregation that fails a check (the ones before it
        have been yielded). A reader replays once: make a new one to read again.
        """
        links = await self.walk()
        limiter = self.limiter
        # The links to replay: skip copies wholly before the start, stop before the end. A
        # header read from piece 0 alone is only a hint here; the checks are repeated on
        # the opened aggregations.
        todo: list[ChainLink] = []
        for link in links:
            if link.checkpoint is not None:
                todo.append(link)
                continue
            if link.verified and limiter.after_end(link.first_sequence, link.epoch):
                break
            if link.verified and limiter.before_start(link.last_sequence, link.epoch):
                link.drop()
                continue
            todo.append(link)
        bounded = not limiter.unbounded
        loop = asyncio.get_running_loop()
        size = max(1, min(BATCH, self.prefetch))
        batches = cut_batches(todo, size)
        ahead = max(1, self.prefetch // size)  # batches in flight besides the awaited one
        pending: deque[asyncio.Task[list[Aggregation | DecodeError]]] = deque()
        self._start_processes(len(todo))  # before any thread of ours exists (fork)
        if self.workers and len(todo) > 1:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self.workers, thread_name_prefix="tlog-decoder")
        started = 0
        try:
            for batch in batches:
                while started < len(batches) and len(pending) <= ahead:
                    pending.append(loop.create_task(self._load_batch(batches[started])))
                    started += 1
                results = await pending.popleft()
                for link, result in zip(batch, results, strict=True):
                    if isinstance(result, DecodeError):
                        raise await explain_missing(self.pool, self.vdisk_id,
                                                    self.checkpoints, result)
                    if bounded and result.blocks and result.checkpoint is None:
                        if limiter.after_end(result.first_sequence, result.epoch):
                            return
                        if limiter.before_start(result.last_sequence, result.epoch):
                            continue
                    blocks, repeats, new_epoch = self._replayed.select(result, limiter)
                    yield ChainItem(result, blocks, len(repeats), list(link.missing),
                                    list(link.corrupt), repeats, new_epoch)
                    if result.checkpoint is None and limiter.passes_end(result):
                        return
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            self._stop_processes()
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None


async def aggregations(pool: StoragePool, vdisk_id: str, opener: RecordOpener, *,
                       start_seq: int = 0, end_seq: int = 0, start_ts: int = 0,
                       end_ts: int = 0, epoch: int | None = None
                       ) -> AsyncIterator[Aggregation]:
    """A vdisk's aggregations, oldest first, each checked (see the module doc).

    The bounds are the limiter's (0 = unbounded, inclusive): they choose which aggregations
    are read; the aggregations are yielded whole, duplicates included.
    """
    reader = ChainReader(pool, vdisk_id, opener,
                         Limiter(start_seq, end_seq, start_ts, end_ts, epoch))
    async for item in reader.items():
        yield item.aggregation
