"""What a vdisk's stored sequences wrote, for tlogserver to tell a client's resend of
stored blocks from a new write that reuses their sequences (docs/durability.md)."""

from __future__ import annotations

from tlog.record.aggregation import ZERO_HASH, RecordOpener
from tlog.record.erasure import ErasureCoder
from tlog.record.identity import StoredWrites, write_identity
from tlog.record.pieces import DecodeError, PieceReader
from tlog.storage import StoragePool

from .checkpoints import CheckpointRef, find_checkpoints
from .fetch import read_aggregation


async def stored_writes(pool: StoragePool, vdisk_id: str, key: bytes, opener: RecordOpener,
                        *, from_sequence: int, epoch: int, limit: int,
                        coder: ErasureCoder | None = None) -> StoredWrites:
    """The identities of each block of ``epoch`` with a sequence >= ``from_sequence``,
    walking back from the aggregation ``key``; at most about ``limit`` blocks (the newest).

    The walk stops at a checkpoint's covered aggregation (the checkpoint list is read again
    once when a record is missing: a compaction may have run meanwhile). Raises DecodeError
    when an aggregation cannot be read.
    """
    found = StoredWrites()
    covered: dict[bytes, CheckpointRef] | None = None

    async def checkpoints() -> dict[bytes, CheckpointRef]:
        reader = PieceReader(pool, coder or ErasureCoder(pool.k, pool.m),
                             matches=opener.key_matches)
        try:
            refs = await find_checkpoints(pool, vdisk_id, reader)
        finally:
            await reader.close()
        return {ref.covered: ref for ref in reversed(refs)}

    while key != ZERO_HASH and len(found.identities) < limit:
        if covered is None:
            covered = await checkpoints()
        ref = covered.get(key)
        if ref is not None:
            if ref.epoch == epoch:
                found.compacted_below = ref.sequence + 1
            break
        try:
            agg = await read_aggregation(pool, key, opener, coder)
        except DecodeError:
            fresh = await checkpoints()
            if key not in fresh or fresh == covered:
                raise
            covered = fresh
            continue
        if agg.epoch != epoch:
            break
        for b in agg.blocks:
            if b.sequence >= from_sequence:
                # Overwritten while walking back: the oldest copy, the one a restore keeps.
                found.identities[b.sequence] = write_identity(b.index, b.operation,
                                                              b.timestamp, b.hash)
        if not agg.blocks or agg.first_sequence <= from_sequence:
            break
        key = agg.prev
    return found
