"""The head of a vdisk's chain: the newest aggregation the storage servers'
``last_hash_<vdisk>`` lists name."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from tlog.record.aggregation import (
    Aggregation,
    RecordOpener,
)
from tlog.record.erasure import ErasureCoder
from tlog.record.pieces import DecodeError, Fetched, PieceReader, TooFewPieces
from tlog.storage import StorageError, StoragePool
from tlog.storage.keys import last_hash_key

from .fetch import open_fetched

log = logging.getLogger(__name__)


class NoLog(DecodeError):
    """The vdisk has no log at all: every read command says so in these words, and fails
    (a mistyped vdisk id or storage address must not look like an empty disk)."""

    def __init__(self, vdisk_id: str) -> None:
        super().__init__(f"vdisk {vdisk_id}: no log: nothing is stored for it on these storage "
                         "servers (check the vdisk id and the storage addresses)")


async def _last_hashes(pool: StoragePool, vdisk_id: str) -> list[list[bytes] | None]:
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
    return lists


@dataclass
class Head:
    agg: Aggregation | None
    lists: list[list[bytes]]  # per server, newest first ([] also for an unreachable one)
    tried: dict[bytes, Aggregation | None]
    errors: dict[bytes, str]
    fetched: dict[bytes, Fetched]
    #: Per server, the newest entry of its list: b"" none, None unreachable (what a writer
    #: continuing the chain compares against before it moves a server's head).
    server_heads: list[bytes | None]


async def find_head(pool: StoragePool, vdisk_id: str, opener: RecordOpener,
                     reader: PieceReader) -> Head:
    found_lists = await _last_hashes(pool, vdisk_id)
    heads = [None if entries is None else (entries[0] if entries else b"")
             for entries in found_lists]
    lists = [entries or [] for entries in found_lists]
    best: Aggregation | None = None
    tried: dict[bytes, Aggregation | None] = {}
    errors: dict[bytes, str] = {}
    fetched: dict[bytes, Fetched] = {}
    unfinished: set[bytes] = set()
    for entries in lists:
        for key in entries:
            if key not in tried:
                try:
                    fetched[key] = await reader.fetch(key)
                    agg = await open_fetched(opener, fetched[key].record, key)
                    if agg.vdisk_id != vdisk_id:
                        raise DecodeError(f"aggregation {key.hex()} belongs to vdisk "
                                          f"{agg.vdisk_id!r}, not {vdisk_id!r}", key)
                    tried[key] = agg
                except DecodeError as exc:
                    errors[key] = str(exc)
                    tried[key] = None
                    if (isinstance(exc, TooFewPieces)
                            and sum(key in other for other in lists) < pool.k):
                        # Named by fewer than k servers and stored on fewer than k: a round
                        # cut short by a crash, never acknowledged (that takes min_pieces
                        # >= k servers, each storing the piece and the name together).
                        unfinished.add(key)
            found = tried[key]
            if found is not None:
                # The newest: the latest epoch, then the highest sequence (a server whose
                # list missed updates names an older aggregation).
                if best is None or ((found.epoch, found.last_sequence)
                                    > (best.epoch, best.last_sequence)):
                    best = found
                break
    if best is None and any(lists):
        if unfinished and set(errors) <= unfinished:
            # Only rounds that never finished: the chain has no aggregation yet.
            log.warning("vdisk %s: ignoring %d unfinished round(s) named in the last-hash "
                        "lists (stored on fewer than k servers, never acknowledged): %s",
                        vdisk_id, len(unfinished), ", ".join(k.hex()[:16] for k in unfinished))
            return Head(None, lists, tried, errors, fetched, heads)
        raise DecodeError(f"vdisk {vdisk_id}: no last hash decodes: "
                          f"{'; '.join(list(errors.values())[:3])}")
    return Head(best, lists, tried, errors, fetched, heads)


async def find_last(pool: StoragePool, vdisk_id: str, opener: RecordOpener,
                    coder: ErasureCoder | None = None) -> Aggregation | None:
    """The newest aggregation of a vdisk, or None when it has none.

    Raises DecodeError when last-hash lists exist but none of their entries can
    be read: continuing a chain we cannot see would fork it.
    """
    reader = PieceReader(pool, coder or ErasureCoder(pool.k, pool.m),
                         matches=opener.key_matches)
    return (await find_head(pool, vdisk_id, opener, reader)).agg


async def find_last_and_heads(pool: StoragePool, vdisk_id: str, opener: RecordOpener
                              ) -> tuple[Aggregation | None, list[bytes | None]]:
    """`find_last`, and each server's newest last-hash entry (see `Head.server_heads`)."""
    reader = PieceReader(pool, ErasureCoder(pool.k, pool.m), matches=opener.key_matches)
    head = await find_head(pool, vdisk_id, opener, reader)
    return head.agg, head.server_heads
