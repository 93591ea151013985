"""Reading a vdisk's log back from its storage pool, checking everything on the way.

A vdisk's log is a chain of aggregations: each names the hash of the one before it
(``prev``), the first one names 32 zero bytes, and the servers' ``last_hash_<vdisk>`` lists
point at the newest. Reading it back takes two passes, because the chain can only be
entered at its head:

1. **Walk back** from the head (`find_last`'s rule: per server, the first entry of its
   last-hash list that decodes; among servers, the one whose aggregation ends with the
   highest sequence) along ``prev`` to the zero hash, or to the aggregation where a
   limiter says older ones cannot matter. Every record is checked against its key
   (hash = key) as it is fetched. A v2 record's plaintext header already holds ``prev``
   and the sequence range, so this pass decrypts nothing for v2; a legacy record must be
   decrypted to learn its ``prev``. What was fetched (or opened) is kept for the second
   pass, within a memory budget; beyond it only the hashes are kept and the records are
   read again.
2. **Replay forward**, oldest first: open each record (AES-GCM tag), check that its
   authenticated ``prev`` is the link the walk followed, that it belongs to the vdisk and
   that every block's BLAKE2b matches its data; then select the blocks a limiter lets
   through, skipping sequences already replayed. Records not kept from the walk are
   fetched ahead, a bounded number at a time.

Pieces: the k data pieces are fetched first; the m parity pieces only when a data piece
is missing or the rebuilt record does not hash to its key. Up to m missing or corrupt
pieces are rebuilt. A server that fails once is not asked again during the same read.

Limiters (as the reference's, which protocol.md describes): a start and an end, by
sequence and/or by block timestamp, 0 meaning unbounded, both bounds inclusive. A block is
replayed when every given bound holds. The walk back stops at the first aggregation
(newest first) whose first sequence is <= the start sequence, or whose oldest block
timestamp is <= the start timestamp; the replay stops after the first aggregation that
holds a block past an end bound. Both shortcuts assume the chain is in sequence and time
order, which the server guarantees apart from re-flushed duplicates.

Duplicates: a server that crashes after storing an aggregation but before the client saw
its FlushOK stores the same sequences again when the client resends them (0-Disk does,
see ``failover/kill9_results.json`` of the reference captures). Both copies carry the same
data, and replaying the older copy again after newer writes would undo them, so a sequence
is replayed once: its first occurrence in chain order. This assumes sequence numbers are
not reused for different data within one vdisk (the reference's limiters assume it too).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from .aggregation import (
    ZERO_HASH,
    Aggregation,
    RecordError,
    RecordOpener,
    check_blocks,
    is_v2,
    parse_v2_header,
    record_hash,
)
from .erasure import ErasureCoder, ErasureError
from .storage import StorageError, StoragePool, last_hash_key
from .wire import Block

log = logging.getLogger(__name__)

__all__ = [
    "ChainItem",
    "ChainLink",
    "ChainReader",
    "DecodeError",
    "Fetched",
    "Limiter",
    "Problem",
    "SequenceSet",
    "VerifyReport",
    "aggregations",
    "fetch_record",
    "find_last",
    "read_aggregation",
    "verify_chain",
]

#: Bytes of fetched records or opened aggregations kept between the walk back and the
#: replay. Beyond it the oldest part of the chain is read a second time instead.
DEFAULT_CACHE_BYTES = 512 * 1024 * 1024
#: Records fetched ahead of the one being replayed.
DEFAULT_PREFETCH = 16


class DecodeError(Exception):
    """An aggregation that cannot be read back (too few pieces, corrupt, wrong key, broken
    chain); the message names the aggregation."""

    def __init__(self, message: str, key: bytes | None = None) -> None:
        super().__init__(message)
        self.key = key


def _short(key: bytes) -> str:
    return key.hex()


# ---------------------------------------------------------------------------------------------
# Limiter


@dataclass(frozen=True)
class Limiter:
    """Which blocks to replay: sequence and/or block-timestamp bounds, 0 = unbounded.

    Bounds are inclusive: a block is replayed when ``start <= value <= end`` for every bound
    given. The sequence and timestamp bounds combine (all must hold).
    """

    start_seq: int = 0
    end_seq: int = 0
    start_ts: int = 0
    end_ts: int = 0

    def __post_init__(self) -> None:
        for name in ("start_seq", "end_seq", "start_ts", "end_ts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
        if self.end_seq and self.start_seq > self.end_seq:
            raise ValueError(f"start sequence {self.start_seq} is after end sequence "
                             f"{self.end_seq}")
        if self.end_ts and self.start_ts > self.end_ts:
            raise ValueError(f"start timestamp {self.start_ts} is after end timestamp "
                             f"{self.end_ts}")

    @property
    def unbounded(self) -> bool:
        """True when every block passes."""
        return not (self.start_seq or self.end_seq or self.start_ts or self.end_ts)

    @property
    def needs_block_times(self) -> bool:
        """True when the walk back must see block timestamps (decrypt as it goes)."""
        return self.start_ts > 0

    def accepts(self, block: Block) -> bool:
        """Whether ``block`` is inside every bound."""
        seq, ts = block.sequence, block.timestamp
        return ((not self.start_seq or seq >= self.start_seq)
                and (not self.end_seq or seq <= self.end_seq)
                and (not self.start_ts or ts >= self.start_ts)
                and (not self.end_ts or ts <= self.end_ts))

    def walk_stops_at(self, first_sequence: int, oldest_block_ts: int | None) -> bool:
        """Whether aggregations older than this one can hold no block to replay.

        ``oldest_block_ts`` is None when the aggregation was not decrypted (v2 header only);
        the walk only asks with it when ``needs_block_times``.
        """
        if self.start_seq and first_sequence <= self.start_seq:
            return True
        return bool(self.start_ts and oldest_block_ts is not None
                    and oldest_block_ts <= self.start_ts)

    def passes_end(self, agg: Aggregation) -> bool:
        """Whether ``agg`` holds a block past an end bound (the replay stops after it)."""
        if self.end_seq and any(b.sequence > self.end_seq for b in agg.blocks):
            return True
        return bool(self.end_ts and any(b.timestamp > self.end_ts for b in agg.blocks))

    def after_end(self, first_sequence: int) -> bool:
        """Whether an aggregation starting at ``first_sequence`` is wholly past the end."""
        return bool(self.end_seq and first_sequence > self.end_seq)

    def before_start(self, last_sequence: int) -> bool:
        """Whether an aggregation ending at ``last_sequence`` is wholly before the start."""
        return bool(self.start_seq and last_sequence < self.start_seq)


# ---------------------------------------------------------------------------------------------
# Sequences already replayed


class SequenceSet:
    """A set of sequence numbers kept as sorted, merged inclusive ranges.

    A vdisk's sequences are nearly contiguous, so this stays a handful of ranges where a
    plain set would hold millions of integers.
    """

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __len__(self) -> int:
        return sum(e - s + 1 for s, e in zip(self._starts, self._ends, strict=True))

    def __contains__(self, seq: object) -> bool:
        if not isinstance(seq, int):
            return False
        i = bisect.bisect_right(self._starts, seq) - 1
        return i >= 0 and seq <= self._ends[i]

    @property
    def max(self) -> int:
        """The highest sequence in the set, -1 when empty."""
        return self._ends[-1] if self._ends else -1

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The inclusive ranges, ascending."""
        return list(zip(self._starts, self._ends, strict=True))

    def add(self, seq: int) -> None:
        """Add one sequence, merging it with neighbouring ranges."""
        starts, ends = self._starts, self._ends
        if ends and ends[-1] + 1 == seq:  # the common case: the next sequence
            ends[-1] = seq
            return
        if not ends or seq > ends[-1] + 1:
            starts.append(seq)
            ends.append(seq)
            return
        i = bisect.bisect_right(starts, seq) - 1
        if i >= 0 and seq <= ends[i]:
            return
        joins_left = i >= 0 and ends[i] + 1 == seq
        joins_right = i + 1 < len(starts) and starts[i + 1] - 1 == seq
        if joins_left and joins_right:
            ends[i] = ends[i + 1]
            del starts[i + 1], ends[i + 1]
        elif joins_left:
            ends[i] = seq
        elif joins_right:
            starts[i + 1] = seq
        else:
            starts.insert(i + 1, seq)
            ends.insert(i + 1, seq)


# ---------------------------------------------------------------------------------------------
# Fetching records


@dataclass
class Fetched:
    """A record read back and checked against its key."""

    record: bytes
    missing: list[int]  # servers that had no piece or were unreachable
    corrupt: list[int] = field(default_factory=list)  # servers whose piece was wrong
    parity_read: bool = False  # whether parity pieces had to be fetched


class _PieceReader:
    """Fetches pieces from a pool, remembering servers that failed so they are not asked
    again (a dead server would cost a connection attempt per record)."""

    def __init__(self, pool: StoragePool, coder: ErasureCoder) -> None:
        self.pool = pool
        self.coder = coder
        self.down: set[int] = set()

    async def _get(self, index: int, key: bytes) -> bytes | None:
        if index in self.down:
            return None
        try:
            return await self.pool.servers[index].get(key)
        except StorageError as exc:
            log.warning("storage server %s unavailable, reading without it: %s",
                        self.pool.servers[index].address, exc)
            self.down.add(index)
            return None

    async def pieces(self, key: bytes, indexes: Sequence[int]) -> list[bytes | None]:
        return list(await asyncio.gather(*(self._get(i, key) for i in indexes)))

    async def fetch(self, key: bytes, all_pieces: bool = False) -> Fetched:
        """The record under ``key``, rebuilt from parity when needed, hash-checked.

        With ``all_pieces`` every piece is fetched and compared with the pieces re-encoded
        from the record, so damaged parity is noticed too (for ``verify``).
        """
        coder = self.coder
        k, n = coder.k, coder.n

        def matches(record: bytes) -> bool:
            return record_hash(record) == key

        if not all_pieces:
            data = await self.pieces(key, range(k))
            if all(p is not None for p in data):
                try:
                    record = coder.decode(data + [None] * coder.m)
                except ErasureError:
                    record = None
                if record is not None and matches(record):
                    return Fetched(record, [])
            pieces = data + await self.pieces(key, range(k, n))
        else:
            pieces = await self.pieces(key, range(n))
        missing = [i for i, p in enumerate(pieces) if p is None]
        if len(missing) == n:
            raise DecodeError(f"aggregation {_short(key)} is not stored on any server", key)
        try:
            record = coder.decode_verified(pieces, matches)
        except ErasureError as exc:
            raise DecodeError(f"aggregation {_short(key)}: cannot rebuild a record that hashes "
                              f"to its key: {exc} (missing pieces: {missing})", key) from None
        # Name the damaged pieces: the ones that differ from a fresh encoding of the record.
        expected = coder.encode(record)
        corrupt = [i for i, p in enumerate(pieces) if p is not None and p != expected[i]]
        return Fetched(record, missing, corrupt, parity_read=True)


async def fetch_record(pool: StoragePool, key: bytes, coder: ErasureCoder | None = None) -> Fetched:
    """The record stored under ``key``, checked against its hash (up to m pieces rebuilt)."""
    reader = _PieceReader(pool, coder or ErasureCoder(pool.k, pool.m))
    return await reader.fetch(key)


def _open(opener: RecordOpener, record: bytes, key: bytes) -> Aggregation:
    try:
        return opener.open(record, key)
    except RecordError as exc:
        raise DecodeError(f"aggregation {_short(key)}: {exc}", key) from None


async def read_aggregation(pool: StoragePool, key: bytes, opener: RecordOpener,
                           coder: ErasureCoder | None = None) -> Aggregation:
    """Fetch, check and open one aggregation."""
    fetched = await fetch_record(pool, key, coder)
    return _open(opener, fetched.record, key)


# ---------------------------------------------------------------------------------------------
# The head of the chain


async def _last_hashes(pool: StoragePool, vdisk_id: str) -> list[list[bytes]]:
    async def one(index: int) -> list[bytes] | None:
        try:
            return await pool.servers[index].list_range(last_hash_key(vdisk_id))
        except StorageError as exc:
            log.warning("last-hash list of %s unavailable on %s: %s", vdisk_id,
                        pool.servers[index].address, exc)
            return None
    lists = await asyncio.gather(*(one(i) for i in range(len(pool.servers))))
    down = sum(1 for entries in lists if entries is None)
    if down > pool.m:
        # With more than m servers silent, "no list" may just mean "not reachable".
        raise DecodeError(f"vdisk {vdisk_id}: {down} of {len(pool.servers)} storage servers "
                          f"unreachable, cannot tell where the chain ends")
    return [entries or [] for entries in lists]


@dataclass
class _Head:
    agg: Aggregation | None
    lists: list[list[bytes]]
    tried: dict[bytes, Aggregation | None]
    errors: dict[bytes, str]


async def _find_head(pool: StoragePool, vdisk_id: str, opener: RecordOpener,
                     reader: _PieceReader) -> _Head:
    lists = await _last_hashes(pool, vdisk_id)
    best: Aggregation | None = None
    tried: dict[bytes, Aggregation | None] = {}
    errors: dict[bytes, str] = {}
    for entries in lists:
        for key in entries:
            if key not in tried:
                try:
                    agg = _open(opener, (await reader.fetch(key)).record, key)
                    if agg.vdisk_id != vdisk_id:
                        raise DecodeError(f"aggregation {_short(key)} belongs to vdisk "
                                          f"{agg.vdisk_id!r}, not {vdisk_id!r}", key)
                    tried[key] = agg
                except DecodeError as exc:
                    errors[key] = str(exc)
                    tried[key] = None
            found = tried[key]
            if found is not None:
                if best is None or found.last_sequence > best.last_sequence:
                    best = found
                break
    if best is None and any(lists):
        raise DecodeError(f"vdisk {vdisk_id}: no last hash decodes: "
                          f"{'; '.join(list(errors.values())[:3])}")
    return _Head(best, lists, tried, errors)


async def find_last(pool: StoragePool, vdisk_id: str, opener: RecordOpener,
                    coder: ErasureCoder | None = None) -> Aggregation | None:
    """The newest aggregation of a vdisk, or None when it has none.

    Raises DecodeError when last-hash lists exist but none of their entries can
    be read: continuing a chain we cannot see would fork it.
    """
    reader = _PieceReader(pool, coder or ErasureCoder(pool.k, pool.m))
    return (await _find_head(pool, vdisk_id, opener, reader)).agg


# ---------------------------------------------------------------------------------------------
# The chain


@dataclass
class ChainLink:
    """One aggregation found by the walk back: what is known of it without replaying it."""

    key: bytes
    prev: bytes
    first_sequence: int
    last_sequence: int
    count: int  # blocks
    timestamp: int  # of the aggregation (flush time)
    record: bytes | None = None  # fetched and hash-checked, not opened yet (v2)
    agg: Aggregation | None = None  # opened already (legacy, the head, time limits)
    missing: list[int] = field(default_factory=list)
    corrupt: list[int] = field(default_factory=list)

    @property
    def cached_bytes(self) -> int:
        if self.agg is not None:
            return self.agg.record_size + self.agg.data_size
        return len(self.record) if self.record is not None else 0


@dataclass
class ChainItem:
    """One aggregation of the replay, oldest first."""

    aggregation: Aggregation
    blocks: list[Block]  # to apply, in stored order: inside the limits, first occurrences
    duplicates: int  # blocks skipped because their sequence was replayed before
    missing: list[int]  # servers whose piece was missing (rebuilt from parity)
    corrupt: list[int]  # servers whose piece was corrupt (rebuilt from parity)


class ChainReader:
    """Reads a vdisk's chain: `walk` back from the head, then iterate `items` oldest first.

    ``opener`` decides the record format (v2, legacy or auto). ``cache_bytes`` bounds what
    the walk keeps for the replay; ``prefetch`` bounds the records fetched ahead.
    ``all_pieces`` fetches and checks every piece, parity included (slower; for verify).
    """

    def __init__(self, pool: StoragePool, vdisk_id: str, opener: RecordOpener,
                 limiter: Limiter | None = None, *, coder: ErasureCoder | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, prefetch: int = DEFAULT_PREFETCH,
                 all_pieces: bool = False,
                 on_walk: Callable[[int], None] | None = None) -> None:
        self.pool = pool
        self.vdisk_id = vdisk_id
        self.opener = opener
        self.limiter = limiter or Limiter()
        self.cache_bytes = cache_bytes
        self.prefetch = max(1, prefetch)
        self.all_pieces = all_pieces
        self.on_walk = on_walk
        self._reader = _PieceReader(pool, coder or ErasureCoder(pool.k, pool.m))
        self._cached = 0
        self.links: list[ChainLink] = []  # oldest first, after walk()
        self.head: _Head | None = None
        self.walked = False
        self.applied = SequenceSet()

    @property
    def down_servers(self) -> list[int]:
        """Servers that failed during this read."""
        return sorted(self._reader.down)

    @property
    def total_blocks(self) -> int:
        """Blocks in the aggregations the walk found (before limits and duplicates)."""
        return sum(link.count for link in self.links)

    @property
    def total_record_bytes(self) -> int:
        return sum(len(link.record) if link.record is not None
                   else link.agg.record_size if link.agg is not None else 0
                   for link in self.links)

    def _keep(self, link: ChainLink) -> None:
        """Drop what the walk fetched once over the memory budget (read again later)."""
        size = link.cached_bytes
        if self._cached + size > self.cache_bytes:
            link.record = None
            link.agg = None
        else:
            self._cached += size

    def _link_from_agg(self, agg: Aggregation, fetched: Fetched | None) -> ChainLink:
        return ChainLink(agg.hash, agg.prev, agg.first_sequence, agg.last_sequence,
                         len(agg.blocks), agg.timestamp, agg=agg,
                         missing=fetched.missing if fetched else [],
                         corrupt=fetched.corrupt if fetched else [])

    def _check_vdisk(self, key: bytes, vdisk_id: str) -> None:
        if vdisk_id != self.vdisk_id:
            raise DecodeError(f"aggregation {_short(key)} belongs to vdisk {vdisk_id!r}, "
                              f"not {self.vdisk_id!r}", key)

    def _make_link(self, key: bytes, fetched: Fetched) -> ChainLink:
        record = fetched.record
        limiter = self.limiter
        if (self.opener.format != "legacy" and is_v2(record)
                and not limiter.needs_block_times):
            try:
                head = parse_v2_header(record)
            except RecordError as exc:
                raise DecodeError(f"aggregation {_short(key)}: {exc}", key) from None
            self._check_vdisk(key, head.vdisk_id)
            return ChainLink(key, head.prev, head.first_sequence, head.last_sequence,
                             head.count, head.timestamp, record=record,
                             missing=fetched.missing, corrupt=fetched.corrupt)
        agg = _open(self.opener, record, key)
        self._check_vdisk(key, agg.vdisk_id)
        return self._link_from_agg(agg, fetched)

    def _stops(self, link: ChainLink) -> bool:
        oldest_ts: int | None = None
        if link.agg is not None:
            oldest_ts = min((b.timestamp for b in link.agg.blocks), default=0)
        return self.limiter.walk_stops_at(link.first_sequence, oldest_ts)

    async def walk(self) -> list[ChainLink]:
        """Find the head and follow ``prev`` back; returns the links, oldest first.

        Raises DecodeError naming the aggregation that cannot be read or whose ``prev`` is
        not stored. An empty list means the vdisk has no log.
        """
        if self.walked:
            return self.links
        head = await _find_head(self.pool, self.vdisk_id, self.opener, self._reader)
        self.head = head
        links: list[ChainLink] = []
        if head.agg is not None:
            link = self._link_from_agg(head.agg, None)
            if self.all_pieces:
                fetched = await self._reader.fetch(link.key, all_pieces=True)
                link.missing, link.corrupt = fetched.missing, fetched.corrupt
            self._keep(link)
            links.append(link)
            seen = {link.key}
            while link.prev != ZERO_HASH and not self._stops(link):
                key = link.prev
                if key in seen:
                    raise DecodeError(f"aggregation {_short(link.key)}: the chain loops back to "
                                      f"{_short(key)}", link.key)
                seen.add(key)
                try:
                    fetched = await self._reader.fetch(key, self.all_pieces)
                except DecodeError as exc:
                    raise DecodeError(
                        f"chain broken at aggregation {_short(link.key)} (sequences "
                        f"{link.first_sequence}..{link.last_sequence}): its prev {exc}",
                        link.key) from None
                link = self._make_link(key, fetched)
                self._keep(link)
                links.append(link)
                if self.on_walk is not None:
                    self.on_walk(len(links))
        links.reverse()
        self.links = links
        self.walked = True
        return links

    async def _fetch_link(self, link: ChainLink) -> Fetched:
        return await self._reader.fetch(link.key, self.all_pieces)

    def _open_link(self, link: ChainLink, fetched: Fetched | None) -> Aggregation:
        agg = link.agg
        if agg is None:
            record = link.record if link.record is not None else (
                fetched.record if fetched is not None else None)
            assert record is not None
            agg = _open(self.opener, record, link.key)
        if fetched is not None:
            link.missing, link.corrupt = fetched.missing, fetched.corrupt
        link.record = None
        link.agg = None
        key = link.key
        if agg.prev != link.prev:
            raise DecodeError(f"aggregation {_short(key)}: its sealed prev {_short(agg.prev)} "
                              f"differs from its header's {_short(link.prev)}", key)
        self._check_vdisk(key, agg.vdisk_id)
        bad = check_blocks(agg)
        if bad:
            shown = ", ".join(str(s) for s in bad[:5]) + (" ..." if len(bad) > 5 else "")
            raise DecodeError(f"aggregation {_short(key)}: {len(bad)} block(s) do not match "
                              f"their BLAKE2b hash (sequences {shown})", key)
        return agg

    def _select(self, agg: Aggregation) -> tuple[list[Block], int]:
        """The blocks of ``agg`` to replay, and how many were duplicates."""
        applied = self.applied
        limiter = self.limiter
        blocks = agg.blocks
        if not blocks:
            return [], 0
        if limiter.unbounded and min(b.sequence for b in blocks) > applied.max:
            for b in blocks:
                applied.add(b.sequence)
            return list(blocks), 0
        chosen: list[Block] = []
        dups = 0
        for b in blocks:
            if not limiter.accepts(b):
                continue
            if b.sequence in applied:
                dups += 1
                continue
            applied.add(b.sequence)
            chosen.append(b)
        return chosen, dups

    async def items(self) -> AsyncIterator[ChainItem]:
        """Replay: every aggregation of the walk, oldest first, checked and opened.

        Raises DecodeError at the first aggregation that fails a check.
        """
        links = await self.walk()
        pending: deque[tuple[int, asyncio.Task[Fetched]]] = deque()
        next_fetch = 0

        def schedule(upto: int) -> None:
            nonlocal next_fetch
            while next_fetch < min(upto, len(links)):
                link = links[next_fetch]
                if link.record is None and link.agg is None:
                    task = asyncio.get_running_loop().create_task(self._fetch_link(link))
                    pending.append((next_fetch, task))
                next_fetch += 1

        try:
            for i, link in enumerate(links):
                if self.limiter.before_start(link.last_sequence):
                    link.record = link.agg = None  # wholly before the start (a duplicate)
                    continue
                if self.limiter.after_end(link.first_sequence):
                    break  # nothing in it or after it to replay
                schedule(i + 1)
                fetched = None
                if link.record is None and link.agg is None:
                    index, task = pending.popleft()
                    assert index == i
                    fetched = await task
                agg = self._open_link(link, fetched)
                schedule(i + 1 + self.prefetch)
                blocks, dups = self._select(agg)
                yield ChainItem(agg, blocks, dups, list(link.missing), list(link.corrupt))
                if self.limiter.passes_end(agg):
                    break
        finally:
            for _, task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*(t for _, t in pending), return_exceptions=True)


async def aggregations(pool: StoragePool, vdisk_id: str, opener: RecordOpener, *,
                       start_seq: int = 0, end_seq: int = 0, start_ts: int = 0,
                       end_ts: int = 0) -> AsyncIterator[Aggregation]:
    """A vdisk's aggregations, oldest first, each checked (see the module doc).

    The bounds are the limiter's (0 = unbounded, inclusive): they choose which aggregations
    are read; the aggregations are yielded whole, duplicates included.
    """
    reader = ChainReader(pool, vdisk_id, opener,
                         Limiter(start_seq, end_seq, start_ts, end_ts))
    async for item in reader.items():
        yield item.aggregation


# ---------------------------------------------------------------------------------------------
# Verify


@dataclass
class Problem:
    """Something wrong with the chain; ``key`` names the aggregation, when there is one."""

    key: bytes | None
    message: str
    severity: str = "error"  # "error" (the log is damaged) or "warning" (redundancy is)

    def __str__(self) -> str:
        return f"{self.severity}: {self.message}"


@dataclass
class VerifyReport:
    """What `verify_chain` found."""

    aggregations: int = 0
    blocks: int = 0
    duplicates: int = 0
    first_sequence: int | None = None
    last_sequence: int | None = None
    head: bytes | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def sound(self) -> bool:
        return not self.errors


def _pieces_problem(key: bytes, missing: Sequence[int], corrupt: Sequence[int],
                    addresses: Sequence[str]) -> Problem | None:
    parts = []
    if missing:
        parts.append("missing on " + ", ".join(f"server {i} ({addresses[i]})" for i in missing))
    if corrupt:
        parts.append("corrupt on " + ", ".join(f"server {i} ({addresses[i]})" for i in corrupt))
    if not parts:
        return None
    return Problem(key, f"aggregation {_short(key)}: piece(s) {'; '.join(parts)} "
                        "(readable from parity)", "warning")


async def verify_chain(pool: StoragePool, vdisk_id: str, opener: RecordOpener, *,
                       allow_gaps: bool = False,
                       coder: ErasureCoder | None = None) -> VerifyReport:
    """Check a vdisk's whole chain and every piece of it; never raises DecodeError.

    Errors (in chain order, oldest first): an aggregation that cannot be read or opened, a
    ``prev`` that is not stored, a block whose hash is wrong, a gap in the sequences (unless
    ``allow_gaps``), a last-hash entry that is not on the chain. Warnings: pieces missing or
    corrupt but rebuilt from parity, entries of last-hash lists that do not decode,
    sequences stored twice.
    """
    report = VerifyReport()
    addresses = [s.address for s in pool.servers]
    reader = ChainReader(pool, vdisk_id, opener, coder=coder, all_pieces=True,
                         cache_bytes=0)
    try:
        links = await reader.walk()
    except DecodeError as exc:
        report.problems.append(Problem(exc.key, str(exc)))
        return report
    head = reader.head
    assert head is not None
    report.head = head.agg.hash if head.agg is not None else None
    on_chain = {link.key for link in links}
    for key, message in head.errors.items():
        report.problems.append(Problem(key, f"last-hash entry {_short(key)} does not decode: "
                                            f"{message}", "warning"))
    for index, entries in enumerate(head.lists):
        for key in entries:
            if head.tried.get(key) is not None and key not in on_chain:
                report.problems.append(Problem(
                    key, f"aggregation {_short(key)} is in the last-hash list of server "
                         f"{index} ({addresses[index]}) but not on the chain from the head "
                         f"{_short(report.head or b'')}: a prev link is broken or the chain "
                         "forked"))
                on_chain.add(key)  # report it once
    high: int | None = None  # highest sequence so far
    high_key: bytes | None = None
    try:
        async for item in reader.items():
            agg = item.aggregation
            report.aggregations += 1
            report.blocks += len(agg.blocks)
            report.duplicates += item.duplicates
            problem = _pieces_problem(agg.hash, item.missing, item.corrupt, addresses)
            if problem is not None:
                report.problems.append(problem)
            if item.duplicates:
                report.problems.append(Problem(
                    agg.hash, f"aggregation {_short(agg.hash)}: {item.duplicates} sequence(s) "
                              "stored before (a re-flush after a crash; replayed once)",
                    "warning"))
            if not agg.blocks:
                continue
            first, last = agg.first_sequence, agg.last_sequence
            if report.first_sequence is None:
                report.first_sequence = first
            if high is not None and first > high + 1 and not allow_gaps:
                report.problems.append(Problem(
                    agg.hash, f"aggregation {_short(agg.hash)}: sequences {high + 1}.."
                              f"{first - 1} are missing between it and the aggregation "
                              f"before it ({_short(high_key or b'')})"))
            if high is None or last > high:
                high, high_key = last, agg.hash
            report.last_sequence = high
    except DecodeError as exc:
        report.problems.append(Problem(exc.key, str(exc)))
    report.problems.sort(key=lambda p: 0 if p.severity == "error" else 1)
    return report
