"""Reading a vdisk's log back from its storage pool, checking everything on the way.

A vdisk's log is a chain of aggregations: each names the hash of the one before it
(``prev``), the first one names 32 zero bytes, and the servers' ``last_hash_<vdisk>`` lists
point at the newest. Reading it back takes two passes, because the chain can only be
entered at its head:

1. **Walk back** from the head (`find_last`'s rule: per server, the first entry of its
   last-hash list that decodes; among servers, the one whose aggregation ends with the
   highest sequence) along ``prev`` to the zero hash, or to the aggregation where a
   limiter says older ones cannot matter. A v2 record's plaintext header holds ``prev``
   and the sequence range, so for v2 this pass reads piece 0's header alone and decrypts
   nothing; storage server 0 follows the chain itself for up to `MAX_HEADER_RUN` records
   per round trip (`_WALK_SCRIPT`), the walk asks piece by piece where it cannot. Such a
   header is only believed for the walk: one that leads to no stored record, or
   that the walk would stop on, is read whole and hash-checked first. A legacy record
   must be fetched whole (hash = key) and decrypted to learn its ``prev``. What was read
   is kept for the second pass within a memory budget; beyond it only the hashes are
   kept and the records are read again.
2. **Replay forward**, oldest first: fetch each record not kept (a few batches ahead,
   one MGET per data server per batch), check that it hashes to its key, open it (AES-GCM
   tag, which covers the v2 header), check that its sealed ``prev`` is the link the walk
   followed, that it belongs to the vdisk and that every block's BLAKE2b matches its
   data (in worker processes, `tlog.bulkread`, or worker threads, while the caller
   applies the previous aggregation); then select the blocks a limiter lets through,
   skipping sequences already replayed.

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
import concurrent.futures
import concurrent.futures.process
import contextlib
import hashlib
import logging
import os
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import redis.asyncio

from .aggregation import (
    NONCE_SIZE,
    ZERO_HASH,
    Aggregation,
    RecordError,
    RecordOpener,
    V2Header,
    check_blocks,
    is_v2,
    parse_v2_header,
    record_hash,
)
from .bulkread import SLOT_BYTES, WorkerPool, client_options, usable_addresses
from .crypto import TAG_SIZE
from .erasure import ErasureCoder, ErasureError
from .protocol.wire import Block
from .storage import ServerAddress, StorageError, StoragePool, last_hash_key

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
    "stored_writes",
    "verify_chain",
    "write_identity",
]

#: Bytes of fetched records or opened aggregations kept between the walk back and the
#: replay. Beyond it the oldest part of the chain is read a second time instead.
DEFAULT_CACHE_BYTES = 512 * 1024 * 1024
#: Records fetched ahead of the one being replayed (about 13 MB of 25-block records; fewer
#: when the aggregations are larger, see `BATCH_BYTES`).
DEFAULT_PREFETCH = 128
#: Records fetched together (one MGET per data server)...
BATCH = 32
#: ...and about as many bytes of plaintext at most (see `_cut_batches`), estimated from the
#: block counts at `BLOCK_ESTIMATE` bytes per block (4 KiB of data and its framing).
BATCH_BYTES = 3 * SLOT_BYTES // 4
BLOCK_ESTIMATE = 4096 + 128
#: Headers storage server 0 reads in its first walk script (`_WALK_SCRIPT`); each next run
#: reads twice as many, up to `MAX_HEADER_RUN` (a few milliseconds of the server's time),
#: so a walk that a start limit stops early reads little more than it needs.
FIRST_HEADER_RUN = 64
MAX_HEADER_RUN = 2048
#: Script runs in a row that find no v2 header before the walk stops asking for them.
SCRIPT_MISSES = 3
#: Links a replay needs before worker processes are forked for it (fewer are read quicker
#: than the processes start).
MIN_PROCESS_LINKS = 64
#: Threads that check and open records while the event loop fetches and applies: one per
#: core, since hashing (most of the work: every record and every block) and decompression
#: run outside the GIL. AES-GCM and parsing hold it, so more would not help.
DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))
#: Sequences whose writes verify remembers per epoch (8 bytes each), to tell re-flushed
#: copies from reused sequences.
VERIFY_IDENTITIES = 16_000_000

T = TypeVar("T")


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

    Sequence bounds name a sequence of one ``epoch`` (None: the epoch of the chain's head,
    the vdisk's current numbering; `ChainReader` fills it in). A block's position is
    (its aggregation's epoch, its sequence), compared in that order: with an end bound the
    earlier epochs are replayed whole and the later ones not at all, with a start bound
    the other way round. A log of one epoch (every log the reference writes) reads as
    plain sequence bounds.
    """

    start_seq: int = 0
    end_seq: int = 0
    start_ts: int = 0
    end_ts: int = 0
    epoch: int | None = None

    def __post_init__(self) -> None:
        for name in ("start_seq", "end_seq", "start_ts", "end_ts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
        if self.epoch is not None and (isinstance(self.epoch, bool)
                                       or not isinstance(self.epoch, int) or self.epoch < 0):
            raise ValueError(f"epoch must be a whole number >= 0, got {self.epoch!r}")
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

    def _at_or_after_start(self, epoch: int, seq: int) -> bool:
        target = epoch if self.epoch is None else self.epoch
        return epoch > target or (epoch == target and seq >= self.start_seq)

    def _at_or_before_end(self, epoch: int, seq: int) -> bool:
        target = epoch if self.epoch is None else self.epoch
        return epoch < target or (epoch == target and seq <= self.end_seq)

    def accepts(self, block: Block, epoch: int = 0) -> bool:
        """Whether ``block`` (of an aggregation of ``epoch``) is inside every bound."""
        seq, ts = block.sequence, block.timestamp
        return ((not self.start_seq or self._at_or_after_start(epoch, seq))
                and (not self.end_seq or self._at_or_before_end(epoch, seq))
                and (not self.start_ts or ts >= self.start_ts)
                and (not self.end_ts or ts <= self.end_ts))

    def walk_stops_at(self, first_sequence: int, oldest_block_ts: int | None,
                      epoch: int = 0) -> bool:
        """Whether aggregations older than this one can hold no block to replay.

        ``oldest_block_ts`` is None when the aggregation was not decrypted (v2 header only);
        the walk only asks with it when ``needs_block_times``.
        """
        if self.start_seq and not self._after_start(epoch, first_sequence):
            return True
        return bool(self.start_ts and oldest_block_ts is not None
                    and oldest_block_ts <= self.start_ts)

    def _after_start(self, epoch: int, seq: int) -> bool:
        target = epoch if self.epoch is None else self.epoch
        return epoch > target or (epoch == target and seq > self.start_seq)

    def passes_end(self, agg: Aggregation) -> bool:
        """Whether ``agg`` holds a block past an end bound (the replay stops after it)."""
        if self.end_seq and any(not self._at_or_before_end(agg.epoch, b.sequence)
                                for b in agg.blocks):
            return True
        return bool(self.end_ts and any(b.timestamp > self.end_ts for b in agg.blocks))

    def after_end(self, first_sequence: int, epoch: int = 0) -> bool:
        """Whether an aggregation starting at ``first_sequence`` is wholly past the end."""
        return bool(self.end_seq and not self._at_or_before_end(epoch, first_sequence))

    def before_start(self, last_sequence: int, epoch: int = 0) -> bool:
        """Whether an aggregation ending at ``last_sequence`` is wholly before the start."""
        return bool(self.start_seq and not self._at_or_after_start(epoch, last_sequence))


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

    def add_new(self, sequences: list[int], low: int) -> None:
        """Add ``sequences``, all above `max` (``low`` is their minimum): a whole range at
        once when they are distinct and consecutive, as an aggregation's usually are."""
        high = max(sequences)
        if high - low + 1 != len(sequences) or len(set(sequences)) != len(sequences):
            for seq in sequences:
                self.add(seq)
            return
        if self._ends and self._ends[-1] + 1 == low:
            self._ends[-1] = high
        else:
            self._starts.append(low)
            self._ends.append(high)

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


#: Run by storage server 0 (Redis EVAL): follow ``prev`` from KEYS[1] through at most
#: ARGV[1] records, returning for each the start of its piece 0 (GETRANGE: the 8-byte length,
#: then the v2 header up to its vdisk id and epoch, then as many bytes as a nonce and a tag,
#: so the header parser sees a plausible record). Piece 0 holds ``uint64 length || record
#: ...``: the magic and version at bytes 8-12, the flags at 14-15 (bit 0: an 8-byte epoch
#: follows the vdisk id), ``prev`` at 48-79, the vdisk id's length at 80-81 (Lua counts
#: from 1). Read-only; a wrong type, a missing key, a record that is not v2 or
#: the zero ``prev`` ends the run. The walk still treats what it returns as piece 0's
#: header: a hint checked when the record is read whole.
_WALK_SCRIPT = """
local key = KEYS[1]
local out = {}
local zero = string.rep('\\0', 32)
for i = 1, tonumber(ARGV[1]) do
  local piece = redis.pcall('GETRANGE', key, 0, 255)
  if type(piece) ~= 'string' or #piece < 82
      or string.sub(piece, 9, 13) ~= 'TLG2\\2' then
    break
  end
  local size = 82 + string.byte(piece, 81) + 256 * string.byte(piece, 82) + 28
  if string.byte(piece, 15) % 2 == 1 then
    size = size + 8
  end
  if size > #piece and #piece == 256 then
    piece = redis.pcall('GETRANGE', key, 0, size - 1)
    if type(piece) ~= 'string' then
      break
    end
  end
  out[#out + 1] = string.sub(piece, 1, size)
  key = string.sub(piece, 49, 80)
  if key == zero then
    break
  end
end
return out
"""


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

    def __init__(self, pool: StoragePool, coder: ErasureCoder, timeout: float = 10.0) -> None:
        self.pool = pool
        self.coder = coder
        self.down: set[int] = set()
        self.timeout = timeout
        self.scripting = True  # whether to try `header_run`
        self._script_client: redis.asyncio.Redis | None = None

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

    async def pieces(self, key: bytes, indexes: Sequence[int],
                     known: dict[int, bytes] | None = None) -> list[bytes | None]:
        """Pieces ``indexes`` of the record under ``key``, fetched concurrently except the
        ``known`` ones; None for a missing piece or an unreachable server."""
        if not known:
            return list(await asyncio.gather(*(self._get(i, key) for i in indexes)))
        wanted = [i for i in indexes if i not in known]
        got = dict(zip(wanted, await asyncio.gather(*(self._get(i, key) for i in wanted)),
                       strict=True))
        return [known[i] if i in known else got[i] for i in indexes]

    async def many(self, index: int, keys: Sequence[bytes]) -> list[bytes | None]:
        """Piece ``index`` of several records in one request (all None if it fails)."""
        if not keys:
            return []
        if index not in self.down:
            try:
                return await self.pool.servers[index].get_many(keys)
            except StorageError as exc:
                log.warning("storage server %s unavailable, reading without it: %s",
                            self.pool.servers[index].address, exc)
                self.down.add(index)
        return [None] * len(keys)

    async def first_piece(self, key: bytes) -> bytes | None:
        """Piece 0 alone: it starts with the record's header."""
        return await self._get(0, key)

    async def header_run(self, key: bytes, limit: int) -> list[bytes] | None:
        """The v2 headers of up to ``limit`` records along the chain from ``key`` back, read
        by storage server 0 itself in one round trip (`_WALK_SCRIPT`): for each record, the
        start of its piece 0 up to the end of its header. The list stops early at a missing
        record, one that is not v2, or the first one. None when server 0 cannot run the
        script (no Redis, scripting disabled, unreachable): the caller walks piece by piece.
        """
        if not self.scripting or 0 in self.down:
            return None
        server = self.pool.servers[0]
        address = getattr(server, "server_address", None)
        if not isinstance(address, ServerAddress):
            self.scripting = False
            return None
        try:
            if self._script_client is None:
                self._script_client = redis.asyncio.Redis(
                    **client_options(address), socket_timeout=self.timeout,
                    socket_connect_timeout=self.timeout)
            reply = await self._script_client.execute_command("EVAL", _WALK_SCRIPT, 1, key,
                                                              limit)
        except (redis.RedisError, OSError, TimeoutError) as exc:
            log.info("storage server %s cannot walk the chain itself (%s): reading headers "
                     "one by one", server.address, exc)
            self.scripting = False
            return None
        if not isinstance(reply, list) or not all(isinstance(x, bytes) for x in reply):
            self.scripting = False
            return None
        return reply

    async def close(self) -> None:
        """Close the connection `header_run` opened, if any."""
        client, self._script_client = self._script_client, None
        if client is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                await client.aclose()

    async def fetch(self, key: bytes, all_pieces: bool = False,
                    known: dict[int, bytes] | None = None) -> Fetched:
        """The record under ``key``, rebuilt from parity when needed, hash-checked.

        The k data pieces are fetched first (except the ``known`` ones), the parity pieces
        only when a data piece is missing or the record does not hash to ``key``. With
        ``all_pieces`` every piece is fetched and compared with the pieces re-encoded from
        the record, so damaged parity is noticed too (for ``verify``).
        """
        coder = self.coder
        k, n = coder.k, coder.n

        def matches(record: bytes) -> bool:
            return record_hash(record) == key

        if not all_pieces:
            data = await self.pieces(key, range(k), known)
            if all(p is not None for p in data):
                try:
                    record = coder.decode(data + [None] * coder.m)
                except ErasureError:
                    record = None
                if record is not None and matches(record):
                    return Fetched(record, [])
            pieces = data + await self.pieces(key, range(k, n))
        else:
            pieces = await self.pieces(key, range(n), known)
        missing = [i for i, p in enumerate(pieces) if p is None]
        if len(missing) == n:
            if self.down:
                raise DecodeError(f"aggregation {_short(key)}: no piece of it could be read "
                                  f"(servers down: {sorted(self.down)})", key)
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
    """Open a record that `_PieceReader.fetch` already checked against its key."""
    try:
        return opener.open(record, key, hash_checked=True)
    except RecordError as exc:
        raise DecodeError(f"aggregation {_short(key)}: {exc}", key) from None


async def read_aggregation(pool: StoragePool, key: bytes, opener: RecordOpener,
                           coder: ErasureCoder | None = None) -> Aggregation:
    """Fetch, check and open one aggregation."""
    fetched = await fetch_record(pool, key, coder)
    return _open(opener, fetched.record, key)


def write_identity(index: int, operation: int, timestamp: int,
                   digest: bytes | bytearray | memoryview) -> bytes:
    """What makes two blocks of one sequence the same write: a resend carries the very
    block the client first sent (its timestamp included); a new write under a reused
    sequence differs at least by its timestamp."""
    return struct.pack("<qBQ", index, operation & 0xFF, timestamp) + bytes(digest)


async def stored_writes(pool: StoragePool, key: bytes, opener: RecordOpener, *,
                        from_sequence: int, epoch: int, limit: int,
                        coder: ErasureCoder | None = None) -> dict[int, bytes]:
    """`write_identity` of each block of ``epoch`` with a sequence >= ``from_sequence``,
    walking back from the aggregation ``key``; at most about ``limit`` blocks (the newest).

    For tlogserver, to tell a client's resend of stored blocks from new writes under the
    same sequences. Raises DecodeError when an aggregation cannot be read.
    """
    found: dict[int, bytes] = {}
    while key != ZERO_HASH and len(found) < limit:
        agg = await read_aggregation(pool, key, opener, coder)
        if agg.epoch != epoch:
            break
        for b in agg.blocks:
            if b.sequence >= from_sequence:
                # Overwritten while walking back: the oldest copy, the one a restore keeps.
                found[b.sequence] = write_identity(b.index, b.operation, b.timestamp, b.hash)
        if not agg.blocks or agg.first_sequence <= from_sequence:
            break
        key = agg.prev
    return found


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
    fetched: dict[bytes, Fetched]


async def _find_head(pool: StoragePool, vdisk_id: str, opener: RecordOpener,
                     reader: _PieceReader) -> _Head:
    lists = await _last_hashes(pool, vdisk_id)
    best: Aggregation | None = None
    tried: dict[bytes, Aggregation | None] = {}
    errors: dict[bytes, str] = {}
    fetched: dict[bytes, Fetched] = {}
    for entries in lists:
        for key in entries:
            if key not in tried:
                try:
                    fetched[key] = await reader.fetch(key)
                    agg = _open(opener, fetched[key].record, key)
                    if agg.vdisk_id != vdisk_id:
                        raise DecodeError(f"aggregation {_short(key)} belongs to vdisk "
                                          f"{agg.vdisk_id!r}, not {vdisk_id!r}", key)
                    tried[key] = agg
                except DecodeError as exc:
                    errors[key] = str(exc)
                    tried[key] = None
            found = tried[key]
            if found is not None:
                # The newest: the latest epoch, then the highest sequence (a server whose
                # list missed updates names an older aggregation).
                if best is None or ((found.epoch, found.last_sequence)
                                    > (best.epoch, best.last_sequence)):
                    best = found
                break
    if best is None and any(lists):
        raise DecodeError(f"vdisk {vdisk_id}: no last hash decodes: "
                          f"{'; '.join(list(errors.values())[:3])}")
    return _Head(best, lists, tried, errors, fetched)


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
    """One aggregation found by the walk back: what is known of it before the replay.

    A link walked through its v2 header alone (``verified`` False) holds only piece 0; its
    header is checked when the record is fetched whole and opened (hash = key, then the
    AES-GCM tag, which covers the header).
    """

    key: bytes
    prev: bytes
    first_sequence: int
    last_sequence: int
    count: int  # blocks
    timestamp: int  # of the aggregation (flush time)
    record: bytes | None = None  # fetched and hash-checked, not opened yet (v2)
    agg: Aggregation | None = None  # opened already (legacy, the head, time limits)
    piece0: bytes | None = None  # the first piece, when only the header was read
    verified: bool = True  # whether the fields above come from a hash-checked record
    missing: list[int] = field(default_factory=list)
    corrupt: list[int] = field(default_factory=list)
    epoch: int = 0

    @property
    def cached_bytes(self) -> int:
        if self.agg is not None:
            return self.agg.record_size + self.agg.data_size
        if self.record is not None:
            return len(self.record)
        return len(self.piece0) if self.piece0 is not None else 0

    def drop(self) -> None:
        """Forget what was fetched (it is read again when needed)."""
        self.record = self.agg = self.piece0 = None


@dataclass
class ChainItem:
    """One aggregation of the replay, oldest first."""

    aggregation: Aggregation
    blocks: list[Block]  # to apply, in stored order: inside the limits, first occurrences
    duplicates: int  # blocks skipped because their sequence was replayed before
    missing: list[int]  # servers whose piece was missing (rebuilt from parity)
    corrupt: list[int]  # servers whose piece was corrupt (rebuilt from parity)
    #: The skipped blocks themselves (their sequence came earlier in the same epoch).
    repeats: list[Block] = field(default_factory=list)
    #: Whether this aggregation starts a new epoch (the first one of a chain does not).
    new_epoch: bool = False


_PREFIX = struct.Struct("<Q")
#: One record of a batch for `ChainReader._open_many`: its link, and the opened aggregation,
#: the record or the k data pieces, whichever is at hand (all None: fetch it first).
_Job = tuple[ChainLink, Aggregation | None, bytes | None, list[bytes] | None]


def _header_of_piece(piece: bytes | None) -> V2Header | None:
    """The v2 header at the start of piece 0, when the piece holds all of it."""
    if piece is None or len(piece) < _PREFIX.size:
        return None
    (length,) = _PREFIX.unpack_from(piece)
    start = piece[_PREFIX.size:_PREFIX.size + length]
    if not is_v2(start):
        return None
    try:
        head = parse_v2_header(start)
    except RecordError:
        return None
    return head if head.size + NONCE_SIZE + TAG_SIZE <= length else None


def _cut_batches(links: list[ChainLink], size: int) -> list[list[ChainLink]]:
    """The links in batches of at most ``size`` records and about `BATCH_BYTES` of
    plaintext (by their block counts): aggregations of 250 blocks come 6 to a batch, so a
    batch still fits a worker's shared slot and the read-ahead stays a few batches."""
    out: list[list[ChainLink]] = []
    batch: list[ChainLink] = []
    held = 0
    for link in links:
        estimate = max(1, link.count) * BLOCK_ESTIMATE
        if batch and (len(batch) >= size or held + estimate > BATCH_BYTES):
            out.append(batch)
            batch, held = [], 0
        batch.append(link)
        held += estimate
    if batch:
        out.append(batch)
    return out


class ChainReader:
    """Reads a vdisk's chain: `walk` back from the head, then iterate `items` oldest first.

    ``opener`` decides the record format (v2, legacy or auto). ``cache_bytes`` bounds what
    the walk keeps for the replay; ``prefetch`` bounds the records fetched ahead.
    ``workers`` threads check and open records while the caller applies the previous ones
    (hashing and decompression run outside the GIL); 0 opens them in the event loop's thread.
    ``all_pieces`` fetches and checks every piece, parity included (slower; for verify).
    ``processes``: open the records of a long replay in ``workers`` forked processes
    (`tlog.bulkread`) instead of threads; None (the default) does when there are two
    workers or more, the storage servers are plain Redis servers and fork is available.
    ``timeout``: seconds to wait for a storage server in the workers and the walk script.
    """

    def __init__(self, pool: StoragePool, vdisk_id: str, opener: RecordOpener,
                 limiter: Limiter | None = None, *, coder: ErasureCoder | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, prefetch: int = DEFAULT_PREFETCH,
                 workers: int = DEFAULT_WORKERS, all_pieces: bool = False,
                 on_walk: Callable[[int], None] | None = None,
                 processes: bool | None = None, timeout: float = 10.0) -> None:
        self.pool = pool
        self.vdisk_id = vdisk_id
        self.opener = opener
        self.limiter = limiter or Limiter()
        self.cache_bytes = cache_bytes
        self.prefetch = max(1, prefetch)
        self.workers = max(0, workers)
        self.all_pieces = all_pieces
        self.on_walk = on_walk
        self.coder = coder or ErasureCoder(pool.k, pool.m)
        self.processes = processes
        self.timeout = timeout
        self._reader = _PieceReader(pool, self.coder, timeout)
        self._procs: WorkerPool | None = None
        # key -> its v2 header as server 0 read it (`_read_ahead`); None: not a v2 header
        self._ahead: dict[bytes, V2Header | None] = {}
        self._run_size = FIRST_HEADER_RUN
        self._script_misses = 0  # script runs in a row that found no header
        self._cached = 0
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.links: list[ChainLink] = []  # oldest first, after walk()
        self.head: _Head | None = None
        self.walked = False
        self.applied = SequenceSet()  # sequences replayed in the current epoch
        self._epoch = 0
        self._epoch_seen = False

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
        return ChainLink(agg.hash, agg.prev, agg.first_sequence, agg.last_sequence,
                         len(agg.blocks), agg.timestamp, agg=agg,
                         missing=fetched.missing if fetched else [],
                         corrupt=fetched.corrupt if fetched else [], epoch=agg.epoch)

    def _check_vdisk(self, key: bytes, vdisk_id: str) -> None:
        if vdisk_id != self.vdisk_id:
            raise DecodeError(f"aggregation {_short(key)} belongs to vdisk {vdisk_id!r}, "
                              f"not {self.vdisk_id!r}", key)

    @property
    def _headers_suffice(self) -> bool:
        """Whether the walk can go by v2 headers (no block timestamps needed)."""
        return self.opener.format != "legacy" and not self.limiter.needs_block_times

    def _make_link(self, key: bytes, fetched: Fetched) -> ChainLink:
        """A verified link from a fetched record: by its header (v2), else opened."""
        record = fetched.record
        if self._headers_suffice and is_v2(record):
            try:
                head = parse_v2_header(record)
            except RecordError as exc:
                raise DecodeError(f"aggregation {_short(key)}: {exc}", key) from None
            self._check_vdisk(key, head.vdisk_id)
            return ChainLink(key, head.prev, head.first_sequence, head.last_sequence,
                             head.count, head.timestamp, record=record,
                             missing=fetched.missing, corrupt=fetched.corrupt,
                             epoch=head.epoch)
        agg = _open(self.opener, record, key)
        self._check_vdisk(key, agg.vdisk_id)
        return self._link_from_agg(agg, fetched)

    async def _read_ahead(self, key: bytes) -> None:
        """Have storage server 0 read the headers of the next links from ``key`` back in
        one round trip (`_PieceReader.header_run`), for `_step` to use."""
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
        for prefix in run:
            head = _header_of_piece(prefix)
            self._ahead[key] = head
            if head is None:
                break
            key = head.prev

    async def _step(self, key: bytes) -> ChainLink:
        """The link of ``key``: from piece 0's v2 header when that suffices, else verified."""
        known = None
        if self._headers_suffice and not self.all_pieces:
            if key not in self._ahead and self._reader.scripting:
                await self._read_ahead(key)
            head = self._ahead.pop(key, None)
            if head is not None and head.vdisk_id == self.vdisk_id:
                return ChainLink(key, head.prev, head.first_sequence, head.last_sequence,
                                 head.count, head.timestamp, verified=False,
                                 epoch=head.epoch)
            piece = await self._reader.first_piece(key)
            head = _header_of_piece(piece)
            if head is not None and head.vdisk_id == self.vdisk_id:
                return ChainLink(key, head.prev, head.first_sequence, head.last_sequence,
                                 head.count, head.timestamp, piece0=piece, verified=False,
                                 epoch=head.epoch)
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
        head = await _find_head(self.pool, self.vdisk_id, self.opener, self._reader)
        self.head = head
        links: list[ChainLink] = []
        if self.limiter.epoch is None:
            # Sequence bounds name the vdisk's current numbering: the head's epoch.
            self.limiter = replace(self.limiter,
                                   epoch=head.agg.epoch if head.agg is not None else 0)
        if head.agg is not None:
            link = self._link_from_agg(head.agg, head.fetched.get(head.agg.hash))
            if self.all_pieces:
                fetched = await self._reader.fetch(link.key, all_pieces=True)
                link.missing, link.corrupt = fetched.missing, fetched.corrupt
            links.append(link)
            seen = {link.key}
            while True:
                if link.prev != ZERO_HASH and self._stops(link) and not link.verified:
                    link = links[-1] = await self._verified(link)  # stop on checked facts
                if link.prev == ZERO_HASH or self._stops(link):
                    break
                key = link.prev
                if key in seen:
                    raise DecodeError(f"aggregation {_short(link.key)}: the chain loops back to "
                                      f"{_short(key)}", link.key)
                try:
                    nxt = await self._step(key)
                except DecodeError as exc:
                    if not link.verified:
                        # The header we followed came from piece 0 alone: check it first.
                        link = links[-1] = await self._verified(link)
                        if link.prev != key:
                            continue
                    raise DecodeError(
                        f"chain broken at aggregation {_short(link.key)} (sequences "
                        f"{link.first_sequence}..{link.last_sequence}): its prev {exc}",
                        link.key) from None
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
        if agg.prev != link.prev:
            raise DecodeError(f"aggregation {_short(key)}: its sealed prev {_short(agg.prev)} "
                              f"differs from the link followed to it ({_short(link.prev)})",
                              key)
        self._check_vdisk(key, agg.vdisk_id)
        bad = check_blocks(agg)
        if bad:
            shown = ", ".join(str(s) for s in bad[:5]) + (" ..." if len(bad) > 5 else "")
            raise DecodeError(f"aggregation {_short(key)}: {len(bad)} block(s) do not match "
                              f"their BLAKE2b hash (sequences {shown})", key)
        return agg

    def _open_record(self, link: ChainLink, record: bytes) -> Aggregation:
        return self._finish(link, _open(self.opener, record, link.key))

    def _join_and_open(self, link: ChainLink, data: list[bytes]) -> Aggregation | None:
        """The aggregation of k data pieces, None if they do not hash to the key."""
        try:
            record = self.coder.decode([*data, *([None] * self.coder.m)])
        except ErasureError:
            return None
        if record_hash(record) != link.key:
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
                                 slots=self.prefetch // size + 2)

    def _stop_processes(self) -> None:
        procs, self._procs = self._procs, None
        if procs is not None:
            procs.close()

    async def _load_batch(self, batch: list[ChainLink]) -> list[Aggregation | DecodeError]:
        """Load several links: in the worker processes when there are some, else (and for
        whatever they hand back unopened) in this process."""
        procs = self._procs
        need = [link for link in batch if link.agg is None and link.record is None]
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

    def _select(self, agg: Aggregation) -> tuple[list[Block], list[Block], bool]:
        """The blocks of ``agg`` to replay, those skipped as repeats, and whether ``agg``
        starts a new epoch.

        Within an epoch a sequence is replayed once, at its first occurrence: a later
        copy is a re-flush of the same write (see the module doc). A later epoch is a new
        numbering whose blocks are all replayed, over whatever came before.
        """
        new_epoch = False
        if agg.epoch > self._epoch:
            new_epoch = self._epoch_seen
            self._epoch = agg.epoch
            self.applied = SequenceSet()
        self._epoch_seen = True
        applied = self.applied
        limiter = self.limiter
        blocks = agg.blocks
        if not blocks:
            return [], [], new_epoch
        if limiter.unbounded:
            sequences = [b.sequence for b in blocks]
            low = min(sequences)
            if low > applied.max:  # the common case: everything is new
                applied.add_new(sequences, low)
                return list(blocks), [], new_epoch
        chosen: list[Block] = []
        repeats: list[Block] = []
        epoch = agg.epoch
        for b in blocks:
            if not limiter.accepts(b, epoch):
                continue
            if b.sequence in applied:
                repeats.append(b)
                continue
            applied.add(b.sequence)
            chosen.append(b)
        return chosen, repeats, new_epoch

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
            if link.verified and limiter.after_end(link.first_sequence, link.epoch):
                break
            if link.verified and limiter.before_start(link.last_sequence, link.epoch):
                link.drop()
                continue
            todo.append(link)
        bounded = not limiter.unbounded
        loop = asyncio.get_running_loop()
        size = max(1, min(BATCH, self.prefetch))
        batches = _cut_batches(todo, size)
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
                        raise result
                    if bounded and result.blocks:
                        if limiter.after_end(result.first_sequence, result.epoch):
                            return
                        if limiter.before_start(result.last_sequence, result.epoch):
                            continue
                    blocks, repeats, new_epoch = self._select(result)
                    yield ChainItem(result, blocks, len(repeats), list(link.missing),
                                    list(link.corrupt), repeats, new_epoch)
                    if limiter.passes_end(result):
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
    duplicates: int = 0  # blocks whose sequence came before in the same epoch
    #: ...of which re-flushed copies (the same write stored again: harmless)...
    copies: int = 0
    #: ...and reused sequences: a different write under a sequence already stored in the
    #: epoch. The restore keeps the first; the later write is lost (errors below).
    reused: int = 0
    #: (epoch, key of its first aggregation, its first sequence), in chain order
    epochs: list[tuple[int, bytes, int]] = field(default_factory=list)
    first_sequence: int | None = None  # of the last epoch
    last_sequence: int | None = None  # of the last epoch
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


class _Identities:
    """What each sequence of an epoch wrote (index, operation, timestamp, hash), for verify
    to tell a re-flushed copy from a reused sequence: an 8-byte digest per sequence, in one
    array by offset from the epoch's first sequence (sequences are nearly contiguous), for
    up to `VERIFY_IDENTITIES` sequences; the others are not compared."""

    _ZERO = bytes(8)

    def __init__(self) -> None:
        self._base: int | None = None
        self._buf = bytearray()

    @staticmethod
    def _digest(b: Block) -> bytes:
        digest = hashlib.blake2b(struct.pack("<qBQ", b.index, b.operation & 0xFF, b.timestamp)
                                 + bytes(b.hash), digest_size=8).digest()
        return digest if digest != _Identities._ZERO else b"\x01" + digest[1:]

    def _offset(self, seq: int) -> int | None:
        if self._base is None:
            self._base = seq
        off = seq - self._base
        return off if 0 <= off < VERIFY_IDENTITIES else None

    def add(self, b: Block) -> None:
        off = self._offset(b.sequence)
        if off is None:
            return
        end = 8 * off + 8
        if len(self._buf) < end:
            self._buf.extend(bytes(max(end - len(self._buf), len(self._buf))))
        self._buf[end - 8:end] = self._digest(b)

    def compare(self, b: Block) -> bool | None:
        """True: the same write as the first of its sequence; False: another; None: unknown."""
        off = self._offset(b.sequence)
        if off is None or 8 * off + 8 > len(self._buf):
            return None
        known = bytes(self._buf[8 * off:8 * off + 8])
        return None if known == self._ZERO else known == self._digest(b)


async def verify_chain(pool: StoragePool, vdisk_id: str, opener: RecordOpener, *,
                       allow_gaps: bool = False,
                       coder: ErasureCoder | None = None) -> VerifyReport:
    """Check a vdisk's whole chain and every piece of it; never raises DecodeError.

    Errors (in chain order, oldest first): an aggregation that cannot be read or opened, a
    ``prev`` that is not stored, a block whose hash is wrong, a gap in the sequences (unless
    ``allow_gaps``), a last-hash entry that is not on the chain. Warnings: pieces missing or
    corrupt but rebuilt from parity, entries of last-hash lists that do not decode,
    re-flushed copies. Sequences reused for different data within one epoch are errors:
    the restore keeps the first write of each (docs/durability.md).
    """
    report = VerifyReport()
    addresses = [s.address for s in pool.servers]
    reader = ChainReader(pool, vdisk_id, opener, coder=coder, all_pieces=True)
    try:
        links = await reader.walk()
    except DecodeError as exc:
        report.problems.append(Problem(exc.key, str(exc)))
        return report
    head = reader.head
    assert head is not None
    report.head = head.agg.hash if head.agg is not None else None
    on_chain = {link.key for link in links}
    # Every entry of the last-hash lists must be on the chain: the newest aggregations are
    # all listed, so one that is not was cut off by a broken prev link (or a fork).
    for index, entries in enumerate(head.lists):
        for key in entries:
            if key in on_chain:
                continue
            on_chain.add(key)  # report it once
            message = head.errors.get(key)
            if message is None and head.tried.get(key) is None:
                try:
                    agg = _open(opener, (await reader._reader.fetch(key)).record, key)
                    if agg.vdisk_id != vdisk_id:
                        message = f"belongs to vdisk {agg.vdisk_id!r}"
                except DecodeError as exc:
                    message = str(exc)
            if message is not None:
                report.problems.append(Problem(
                    key, f"last-hash entry {_short(key)} of server {index} ({addresses[index]}) "
                         f"does not decode: {message}", "warning"))
                continue
            report.problems.append(Problem(
                key, f"aggregation {_short(key)} is in the last-hash list of server {index} "
                     f"({addresses[index]}) but not on the chain from the head "
                     f"{_short(report.head or b'')}: a prev link is broken or the chain forked"))
    high: int | None = None  # highest sequence so far, in the current epoch
    high_key: bytes | None = None
    seen = _Identities()  # what each sequence of the current epoch wrote
    try:
        async for item in reader.items():
            agg = item.aggregation
            report.aggregations += 1
            report.blocks += len(agg.blocks)
            report.duplicates += item.duplicates
            problem = _pieces_problem(agg.hash, item.missing, item.corrupt, addresses)
            if problem is not None:
                report.problems.append(problem)
            if not report.epochs or item.new_epoch:
                if report.epochs and agg.epoch <= report.epochs[-1][0]:
                    report.problems.append(Problem(agg.hash, f"aggregation {_short(agg.hash)}: "
                                                   f"epoch {agg.epoch} after epoch "
                                                   f"{report.epochs[-1][0]}"))
                report.epochs.append((agg.epoch, agg.hash, agg.first_sequence))
                high = high_key = report.first_sequence = None
                seen = _Identities()
            elif agg.epoch < report.epochs[-1][0]:
                report.problems.append(Problem(agg.hash, f"aggregation {_short(agg.hash)}: "
                                               f"epoch {agg.epoch} after epoch "
                                               f"{report.epochs[-1][0]}"))
            repeats = {id(b) for b in item.repeats}
            copies = reused = 0
            reused_seqs: list[int] = []
            for b in agg.blocks:
                if id(b) in repeats:
                    verdict = seen.compare(b)
                    if verdict is False:
                        reused += 1
                        reused_seqs.append(b.sequence)
                    else:
                        copies += 1
                else:
                    seen.add(b)
            report.copies += copies
            report.reused += reused
            if copies:
                report.problems.append(Problem(
                    agg.hash, f"aggregation {_short(agg.hash)}: {copies} block(s) stored "
                              f"before in epoch {agg.epoch} with the same content (a "
                              "re-flush after a crash; replayed once)", "warning"))
            if reused:
                shown = ", ".join(str(q) for q in reused_seqs[:8])
                report.problems.append(Problem(
                    agg.hash, f"aggregation {_short(agg.hash)}: {reused} sequence(s) of epoch "
                              f"{agg.epoch} reused for different data ({shown}"
                              f"{', ...' if reused > 8 else ''}): a restore keeps the first "
                              "write of each and drops these (a client restarted its "
                              "numbering on a server without epochs)"))
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
