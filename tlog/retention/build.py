"""Building a checkpoint: the last write of every block index up to the cut, sealed as
checkpoint parts and stored as they fill, in bounded memory.

Two passes over the chain up to the cut (starting from the previous checkpoint, if any):

1. **replay**: which aggregation (and which of its blocks) holds the last write of each
   index. About 100 bytes per index; no block data is kept.
2. **emit**: the aggregations that hold a last write are read again, in chain order, and
   those writes are sealed into parts of `PART_BLOCKS` blocks, each stored once sealed.

A delete that is an index's last write is kept (a block with no data), so that replaying
the checkpoint does to any target (an image written onto, a block device, a Redis block
store) what replaying the covered log did, and the image ends where it did.

Range deletes (`tlog.protocol.ranges`) are kept as ranges: the union of every range of the
covered log, merged, leads the checkpoint (its first parts), and of the single writes only
those newer than any range over their index follow. A whole device trimmed is one range
block, whatever its size: an empty region costs nothing.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import heapq
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tlog.protocol.ranges import RangeError, range_count, range_data
from tlog.protocol.status import Operation
from tlog.protocol.wire import Block
from tlog.read.chain import ChainReader
from tlog.read.checkpoints import CheckpointRef
from tlog.read.fetch import open_fetched
from tlog.read.links import ChainLink
from tlog.record.aggregation import CheckpointMark, RecordOpener, V2Writer
from tlog.record.pieces import DecodeError, Fetched, fetch_record
from tlog.record.steps import run_stepped
from tlog.storage import StoragePool

log = logging.getLogger(__name__)

#: Blocks per checkpoint part (about 1 MiB of 4 KiB blocks).
PART_BLOCKS = 256
#: Aggregations read ahead during the second pass, and the bytes of records they may hold
#: (8 of 100 KB, but two of 16 MB: all their pieces arriving at once would keep the event
#: loop copying replies for tens of milliseconds).
READ_AHEAD = 8
READ_AHEAD_BYTES = 32 * 1024 * 1024
#: Last writes grouped per step between the passes (about a millisecond of CPU).
GROUP_STEP = 4096
#: Blocks replayed in the first pass between two turns of the event loop (a millisecond).
REPLAY_STEP = 256
_DELETE = int(Operation.DELETE)
_DELETE_RANGE = int(Operation.DELETE_RANGE)
_EMPTY_HASH = hashlib.blake2b(b"", digest_size=32).digest()
#: Ranges or single writes looked at between two turns of the event loop while resolved.
RESOLVE_STEP = 4096
# A last write's place: aggregation number << _SHIFT | block number within it.
_SHIFT = 32


class BuildError(Exception):
    """The chain up to the cut does not read back, or changed under the build."""


@dataclass
class Built:
    """A checkpoint sealed and stored."""

    key: bytes  # the hash of its last part
    parts: int
    blocks: int  # live (set)
    deleted: int  # indexes whose last write is a single delete
    epoch: int
    sequence: int
    timestamp: int  # newest block timestamp it stands for (ns)
    ranges: int = 0  # range blocks: the merged union of the log's range deletes


async def build_checkpoint(pool: StoragePool, vdisk_id: str, opener: RecordOpener,
                           writer: V2Writer, records: list[ChainLink],
                           base: CheckpointRef | None,
                           store: Callable[[bytes, bytes], Awaitable[None]], *,
                           timeout: float = 10.0, processes: bool | None = None,
                           check: Callable[[], None] = lambda: None) -> Built:
    """Replay ``records`` (the aggregations up to the cut, oldest first, after ``base``)
    and store the checkpoint of the state after the last one. ``store(hash, record)``
    stores one part (journalled by the caller before it is written); ``check()`` is called
    between parts and may raise to stop."""
    cut = records[-1]
    reader = ChainReader(pool, vdisk_id, opener, head_key=cut.key, timeout=timeout,
                         processes=processes)
    keys: list[bytes] = []  # aggregation number -> its hash (checkpoint parts included)
    sizes: list[int] = []  # aggregation number -> bytes of its record
    last: dict[int, int] = {}  # block index -> where its last write is
    # The range deletes: (first, end, place, sequence, timestamp).
    ranges: list[tuple[int, int, int, int, int]] = []
    newest_ts = base.timestamp if base is not None else 0
    position = (base.epoch, base.sequence) if base is not None else (0, 0)
    replayed: list[bytes] = []
    since_pause = 0  # blocks replayed since the loop last ran something else
    try:
        async for item in reader.items():
            agg = item.aggregation
            since_pause += len(agg.blocks)
            if since_pause >= REPLAY_STEP:
                # The items of a batch come without a pause of their own: milliseconds of
                # work for 32 aggregations, held on the event loop.
                since_pause = 0
                await asyncio.sleep(0)
            number = len(keys) << _SHIFT
            keys.append(agg.hash)
            sizes.append(agg.record_size)
            if item.checkpoint is None:
                replayed.append(agg.hash)
                if agg.blocks:
                    newest_ts = max(newest_ts, max(b.timestamp for b in agg.blocks))
                    position = max(position, (agg.epoch, agg.last_sequence))
            chosen = item.blocks
            if len(chosen) == len(agg.blocks):
                for i, b in enumerate(chosen):
                    last[b.index] = number | i
            else:
                where = {id(b): i for i, b in enumerate(agg.blocks)}
                for b in chosen:
                    last[b.index] = number | where[id(b)]
            if _DELETE_RANGE in [b.operation for b in chosen]:  # (rare: a C-level test)
                _take_ranges(agg.blocks, chosen, number, last, ranges)
    except DecodeError as exc:
        raise BuildError(f"vdisk {vdisk_id}: the aggregations to compact do not read back, "
                         f"nothing was changed: {exc}") from None
    if replayed != [link.key for link in records]:
        raise BuildError(f"vdisk {vdisk_id}: the chain changed while the compaction read it; "
                         "nothing was changed, run again")
    epoch, sequence = position
    applied = tuple(reader.applied.ranges) if reader.epoch == epoch else ()
    deletes = 0
    range_blocks: list[Block] = []
    merged = 0
    if ranges:
        end = max(last) if last else -1
        dropped = await drop_overwritten(last, ranges)
        range_blocks = await merged_ranges(ranges)
        merged = len(range_blocks)
        if dropped > max(last, default=-1):
            # A write a range undid was the image's last block: a delete there keeps the
            # image as long as the covered log made it (a range does not lengthen it).
            assert dropped == end
            newest = max(ranges, key=lambda r: r[3])
            range_blocks.append(Block(newest[3], dropped, newest[4], _DELETE, _EMPTY_HASH,
                                      b""))
            deletes += 1
    total = len(range_blocks) + len(last)
    parts = max(1, -(-total // PART_BLOCKS))
    wanted, order = await grouped_last_writes(last, len(keys))
    prev = cut.key
    part: list[Block] = []
    sealed_parts = 0
    sets = 0

    async def seal(chunk: list[Block]) -> None:
        nonlocal prev, sealed_parts
        check()
        # Adjacent blocks: fewer writes in a restore. Ranges first: the single writes kept
        # are newer than any range over them.
        chunk.sort(key=lambda b: (b.operation != _DELETE_RANGE, b.index))
        mark = CheckpointMark(sealed_parts, parts, cut.key, applied)
        # In steps: a part of 256 blocks of 64 KiB is 16 MB to seal, and tlogserver
        # compacts on the event loop that serves its clients.
        record = await run_stepped(writer.seal_checkpoint_in_steps(
            prev, mark, chunk, sequence, newest_ts, epoch))
        await store(record.hash, record.record)
        prev = record.hash
        sealed_parts += 1

    async def fetch(number: int) -> Fetched:
        return await fetch_record(pool, keys[number], reader.coder)

    # Read ahead, opened one at a time here: the read-ahead's replies tend to come in the
    # same turn of the event loop, and opening them all there would hold it that long.
    pending: dict[int, asyncio.Task[Fetched]] = {}
    try:
        for b in range_blocks:
            part.append(b)
            if len(part) == PART_BLOCKS:
                await seal(part)
                part = []
        for at, number in enumerate(order):
            for ahead in order[at:at + READ_AHEAD]:
                if ahead in pending:
                    continue
                if pending and sum(sizes[n] for n in pending) + sizes[ahead] > READ_AHEAD_BYTES:
                    break  # (the one needed now is always read: it was asked for first)
                pending[ahead] = asyncio.create_task(fetch(ahead))
            try:
                agg = await open_fetched(opener, (await pending.pop(number)).record,
                                         keys[number])
            except DecodeError as exc:
                raise BuildError(f"vdisk {vdisk_id}: an aggregation to compact no longer "
                                 f"reads back (another compaction?): {exc}") from None
            for i in wanted[number]:
                b = agg.blocks[i]
                if b.operation == _DELETE:
                    deletes += 1
                else:
                    sets += 1
                part.append(b)
                if len(part) == PART_BLOCKS:
                    await seal(part)
                    part = []
        if part or sealed_parts == 0:
            await seal(part)
    finally:
        for task in pending.values():
            task.cancel()
        await asyncio.gather(*pending.values(), return_exceptions=True)
    assert sealed_parts == parts
    return Built(prev, parts, sets, deletes, epoch, sequence, newest_ts, merged)


def _take_ranges(blocks: list[Block], chosen: list[Block], number: int,
                 last: dict[int, int], ranges: list[tuple[int, int, int, int, int]]) -> None:
    """Move the range deletes of ``chosen`` (of ``blocks``, aggregation ``number``) from
    ``last`` (where the loop put them as single writes) to ``ranges``."""
    where = {id(b): i for i, b in enumerate(blocks)}
    for b in chosen:
        if b.operation != _DELETE_RANGE:
            continue
        place = number | where[id(b)]
        try:
            count = range_count(b.index, b.data)
        except RangeError as exc:
            raise BuildError(f"sequence {b.sequence}: {exc}") from None
        if last.get(b.index) == place:
            del last[b.index]
        ranges.append((b.index, b.index + count, place, b.sequence, b.timestamp))


async def drop_overwritten(last: dict[int, int],
                           ranges: list[tuple[int, int, int, int, int]]) -> int:
    """Drop from ``last`` the single writes a later range deletes (the checkpoint applies
    its ranges first); the highest index dropped, -1 for none. A sweep over the ranges'
    ends gives the newest range over every stretch of indexes; each single write is looked
    up there."""
    points = sorted({r[0] for r in ranges} | {r[1] for r in ranges})
    starts: dict[int, list[tuple[int, int]]] = {}
    for first, end, place, _, _ in ranges:
        starts.setdefault(first, []).append((-place, end))
    # newest[i]: the place of the newest range over [points[i], points[i + 1]), -1 if none.
    newest: list[int] = []
    active: list[tuple[int, int]] = []  # (-place, end), a max-heap of places
    for n, point in enumerate(points):
        for item in starts.get(point, ()):
            heapq.heappush(active, item)
        while active and active[0][1] <= point:
            heapq.heappop(active)  # ended (lazily: only when on top)
        newest.append(-active[0][0] if active else -1)
        if n % RESOLVE_STEP == RESOLVE_STEP - 1:
            await asyncio.sleep(0)
    doomed: list[int] = []
    for n, (index, place) in enumerate(last.items()):
        at = bisect.bisect_right(points, index) - 1
        if at >= 0 and newest[at] > place:
            doomed.append(index)
        if n % RESOLVE_STEP == RESOLVE_STEP - 1:
            await asyncio.sleep(0)
    for index in doomed:
        del last[index]
    return max(doomed, default=-1)


async def merged_ranges(ranges: list[tuple[int, int, int, int, int]]) -> list[Block]:
    """The union of ``ranges`` as range blocks, in index order: touching or overlapping
    ranges become one, which carries the newest sequence and timestamp among them."""
    ranges.sort()
    out: list[Block] = []
    first, end, _, seq, ts = ranges[0]
    for n, (r_first, r_end, _, r_seq, r_ts) in enumerate(ranges[1:]):
        if r_first <= end:
            end = max(end, r_end)
            seq, ts = max(seq, r_seq), max(ts, r_ts)
        else:
            out.append(_range_block(first, end, seq, ts))
            first, end, seq, ts = r_first, r_end, r_seq, r_ts
        if n % RESOLVE_STEP == RESOLVE_STEP - 1:
            await asyncio.sleep(0)
    out.append(_range_block(first, end, seq, ts))
    return out


def _range_block(first: int, end: int, sequence: int, timestamp: int) -> Block:
    data = range_data(first, end - first)
    return Block(sequence, first, timestamp, _DELETE_RANGE,
                 hashlib.blake2b(data, digest_size=32).digest(), data)


async def grouped_last_writes(last: dict[int, int],
                              count: int) -> tuple[dict[int, list[int]], list[int]]:
    """Which blocks of which aggregation hold the last writes (emptying ``last``), and the
    aggregations that hold any, in chain order. In steps of `GROUP_STEP`: a vdisk of a
    million blocks has a million places to group and sort, over a second of the event
    loop's time in one go."""
    wanted: dict[int, list[int]] = {}
    mask = (1 << _SHIFT) - 1
    while last:
        for _ in range(min(GROUP_STEP, len(last))):
            place = last.popitem()[1]
            found = wanted.get(place >> _SHIFT)
            if found is None:
                wanted[place >> _SHIFT] = [place & mask]
            else:
                found.append(place & mask)
        await asyncio.sleep(0)
    done = 0
    for blocks in wanted.values():
        blocks.sort()
        done += len(blocks)
        if done >= GROUP_STEP:
            done = 0
            await asyncio.sleep(0)
    order: list[int] = []
    for start in range(0, count, GROUP_STEP):
        order.extend(n for n in range(start, min(start + GROUP_STEP, count)) if n in wanted)
        await asyncio.sleep(0)
    return wanted, order
