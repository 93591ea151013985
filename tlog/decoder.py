"""Reading aggregations back from a storage pool.

`fetch_record` gets the pieces of one aggregation and rebuilds the record,
tolerating up to m missing or corrupt pieces. `find_last` applies the
reference's rule to find the newest aggregation of a vdisk: per server, the
first entry of its last-hash list that decodes; among servers, the one whose
aggregation ends with the highest sequence.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from .aggregation import Aggregation, RecordError, RecordOpener, record_hash
from .erasure import ErasureCoder, ErasureError
from .storage import StorageError, StoragePool, last_hash_key

log = logging.getLogger(__name__)


class DecodeError(Exception):
    """An aggregation that cannot be read back (too few pieces, corrupt, wrong key)."""


@dataclass
class Fetched:
    record: bytes
    missing: list[int]  # servers that had no piece or were unreachable


async def _get_piece(pool: StoragePool, index: int, key: bytes) -> bytes | None:
    try:
        return await pool.servers[index].get(key)
    except StorageError as exc:
        log.debug("piece %d of %s unavailable: %s", index, key.hex()[:16], exc)
        return None


async def fetch_record(pool: StoragePool, key: bytes, coder: ErasureCoder | None = None) -> Fetched:
    """The record stored under ``key``, checked against its hash."""
    coder = coder or ErasureCoder(pool.k, pool.m)
    pieces = await asyncio.gather(*(_get_piece(pool, i, key) for i in range(len(pool.servers))))
    missing = [i for i, p in enumerate(pieces) if p is None]
    try:
        record = coder.decode_verified(pieces, lambda rec: record_hash(rec) == key)
    except ErasureError as exc:
        raise DecodeError(f"aggregation {key.hex()}: {exc} (missing pieces: {missing})") from None
    return Fetched(record, missing)


async def read_aggregation(pool: StoragePool, key: bytes, opener: RecordOpener,
                           coder: ErasureCoder | None = None) -> Aggregation:
    """Fetch, check and open one aggregation."""
    fetched = await fetch_record(pool, key, coder)
    try:
        return opener.open(fetched.record, key)
    except RecordError as exc:
        raise DecodeError(f"aggregation {key.hex()}: {exc}") from None


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


async def find_last(pool: StoragePool, vdisk_id: str, opener: RecordOpener,
                    coder: ErasureCoder | None = None) -> Aggregation | None:
    """The newest aggregation of a vdisk, or None when it has none.

    Raises DecodeError when last-hash lists exist but none of their entries can
    be read: continuing a chain we cannot see would fork it.
    """
    coder = coder or ErasureCoder(pool.k, pool.m)
    lists = await _last_hashes(pool, vdisk_id)
    if not any(lists):
        return None
    best: Aggregation | None = None
    tried: dict[bytes, Aggregation | None] = {}
    errors: list[str] = []
    for entries in lists:
        for key in entries:
            if key not in tried:
                try:
                    tried[key] = await read_aggregation(pool, key, opener, coder)
                except DecodeError as exc:
                    errors.append(str(exc))
                    tried[key] = None
            agg = tried[key]
            if agg is not None:
                if best is None or agg.last_sequence > best.last_sequence:
                    best = agg
                break
    if best is None and any(lists):
        raise DecodeError(f"vdisk {vdisk_id}: no last hash decodes: {'; '.join(errors[:3])}")
    return best
