"""How much of a vdisk's log is stored and how far back it can be restored, from the
records' headers alone (for tlogserver's metrics and `tlog compact --dry-run`).

The walk keeps nothing per record, so it costs the same memory for a log of any length:
storage server 0 reads the headers along the chain itself (`PieceReader.header_run`, many
per round trip), down to the checkpoint the log starts from or its first aggregation.
Headers are not authenticated without opening the records: the figures are what the
headers say, which is what a restore finds unless the storage was tampered with. A record
with no v2 header (0-Disk's legacy format) ends the walk; what lies before it is not
counted (``complete`` is False).
"""

from __future__ import annotations

from dataclasses import dataclass

from tlog.read.checkpoints import (
    CheckpointRef,
    checkpoint_parts,
    find_checkpoints,
    registered_checkpoints,
)
from tlog.read.fetch import MAX_HEADER_RUN
from tlog.read.head import find_head
from tlog.record.aggregation import ZERO_HASH, RecordOpener
from tlog.record.erasure import ErasureCoder
from tlog.record.pieces import PieceReader, piece_header
from tlog.storage import StorageError, StoragePool
from tlog.storage.keys import compaction_key


@dataclass
class LogSize:
    """A vdisk's stored log."""

    records: int = 0  # aggregations (checkpoint parts not included)
    blocks: int = 0  # in those aggregations
    stored_bytes: int = 0  # every piece on every server, checkpoint parts included
    checkpoint: CheckpointRef | None = None  # the one the log starts from
    #: Newest block timestamp of the oldest restorable point (ns): the checkpoint's, else
    #: the first aggregation's flush time; None for an empty log.
    oldest_restorable_ns: int | None = None
    complete: bool = True  # False: a record without a v2 header stopped the walk
    head: bytes | None = None  # the aggregation the walk started from


async def measure_log(pool: StoragePool, vdisk_id: str, opener: RecordOpener, *,
                      timeout: float = 10.0) -> LogSize:
    """Walk the chain's headers from the head; raises DecodeError if the head cannot be
    found (an empty log is a zero `LogSize`)."""
    coder = ErasureCoder(pool.k, pool.m)
    reader = PieceReader(pool, coder, timeout)
    size = LogSize()
    factor = (pool.k + pool.m) / pool.k
    try:
        head = await find_head(pool, vdisk_id, opener, reader)
        if head.agg is None:
            return size
        covered = {ref.covered: ref for ref in reversed(
            await find_checkpoints(pool, vdisk_id, reader))}
        key = size.head = head.agg.hash
        ahead: list[bytes] = []
        while key != ZERO_HASH:
            ref = covered.get(key)
            if ref is not None:
                size.checkpoint = ref
                size.oldest_restorable_ns = ref.timestamp
                await _add_parts(reader, ref, size, factor)
                break
            if not ahead:
                ahead = list(reversed(await reader.header_run(key, MAX_HEADER_RUN) or []))
            piece = ahead.pop() if ahead else await reader.first_piece(key)
            got = piece_header(piece)
            if got is None or got[0].vdisk_id != vdisk_id:
                size.complete = False
                break
            header, length = got
            size.records += 1
            size.blocks += header.count
            size.stored_bytes += int(length * factor)
            size.oldest_restorable_ns = header.timestamp
            key = header.prev
    finally:
        await reader.close()
    return size


async def _add_parts(reader: PieceReader, ref: CheckpointRef, size: LogSize,
                     factor: float) -> None:
    parts = await checkpoint_parts(reader, ref.key)
    size.stored_bytes += sum(int(length * factor) for _key, length in parts)
    if len(parts) != ref.parts:
        size.complete = False


async def compaction_marks(pool: StoragePool, vdisk_id: str) -> tuple[tuple[bytes, ...], bool]:
    """What compactions leave on storage, cheap to read (a list and a key per server): the
    registered checkpoints, and whether one is unfinished (its journal is there). A log
    measured before these changed was compacted since by someone else (`tlog compact`)."""
    checkpoints = tuple(await registered_checkpoints(pool, vdisk_id))
    key = compaction_key(vdisk_id)
    unfinished = False
    for server in pool.servers:
        try:
            if await server.get(key) is not None:
                unfinished = True
                break
        except StorageError:
            continue
    return checkpoints, unfinished
