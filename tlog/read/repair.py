"""Rebuilding the pieces a vdisk's aggregations lost: after a degraded flush, or a storage
server that came back empty.

tlogserver acknowledges a flush once ``min_pieces`` of the k+m servers stored it (see
``tlogserver.flusher``). The pieces that did not land are recorded, in the same pipeline as
the pieces themselves, on the servers that stored them: one **marker** key per aggregation,

    tlog_missing_<vdiskID>:<hex hash>  ->  "2,5"  (the servers that missed it)

A marker is a hint, never the only source of truth: `repair_vdisk` reads every piece of
each aggregation it looks at and rewrites whatever is missing or differs from a fresh
encoding of the record, so a stale marker (the server stored its piece after all) costs a
read, and pieces lost without a marker (a server restarted without persistence, a crash
between two writes) are found by scanning the chain. A marker is deleted once every piece
of its aggregation is in place.

Markers are found with ``SCAN`` on each Redis server (no index key to keep consistent);
the pieces are read and written through the storage pool like everything else. The marker's
key and value are laid out in `tlog.storage.keys`, which tlogserver's flusher writes them by.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tlog.record.aggregation import RecordOpener
from tlog.record.erasure import ErasureCoder, ErasureError
from tlog.record.pieces import DecodeError, KeyCheck
from tlog.storage import RedisStorageServer, StorageError, StoragePool
from tlog.storage.keys import (
    LAST_HASH_KEEP,
    last_hash_key,
    marker_hash,
    marker_key,
    marker_pattern,
)

from .chain import ChainReader

log = logging.getLogger(__name__)

__all__ = ["RepairReport", "find_markers", "repair_vdisk"]

#: Aggregations read and written together (one MGET / MSET per server).
BATCH = 64


def _client(server: RedisStorageServer, timeout: float = 10.0) -> redis.asyncio.Redis:
    """A plain client for the commands the storage pool has no method for (SCAN, DEL);
    one attempt per command, as the pool's own calls (redis-py would retry with backoff)."""
    return redis.asyncio.Redis(**server.server_address.redis_kwargs(),  # credentials, TLS
                               socket_timeout=timeout, socket_connect_timeout=timeout,
                               retry=Retry(NoBackoff(), 0))


async def find_markers(pool: StoragePool, vdisk_id: str) -> tuple[dict[bytes, set[int]],
                                                                   list[int]]:
    """The aggregations the markers name (hash -> servers holding a marker for it), and the
    servers that could not be searched (down, or not Redis)."""
    pattern = marker_pattern(vdisk_id)
    found: dict[bytes, set[int]] = {}
    unsearched: list[int] = []

    async def search(index: int) -> list[bytes] | None:
        server = pool.servers[index]
        if not isinstance(server, RedisStorageServer):
            return None
        client = _client(server)
        try:
            return [bytes(name) async for name in client.scan_iter(match=pattern, count=1000)]
        except (redis.RedisError, OSError) as exc:
            log.warning("cannot search %s for missing-piece markers: %s", server.address, exc)
            return None
        finally:
            await client.aclose()

    results = await asyncio.gather(*(search(i) for i in range(len(pool.servers))))
    for index, names in enumerate(results):
        if names is None:
            unsearched.append(index)
            continue
        for name in names:
            key = marker_hash(vdisk_id, name)
            if key is not None:
                found.setdefault(key, set()).add(index)
    return found, unsearched


@dataclass
class RepairReport:
    """What `repair_vdisk` found and did."""

    aggregations: int = 0  # aggregations whose pieces were checked
    recorded: int = 0  # aggregations named by a marker
    scanned: int = 0  # aggregations found by walking the chain
    rewritten: dict[int, int] = field(default_factory=dict)  # server index -> pieces written
    found_by_scan: int = 0  # pieces rewritten that no marker named
    markers_cleared: int = 0
    lists_restored: list[int] = field(default_factory=list)  # servers given a last-hash list
    unreachable: list[int] = field(default_factory=list)  # servers that could not be written
    problems: list[str] = field(default_factory=list)  # what could not be repaired
    dry_run: bool = False

    @property
    def pieces(self) -> int:
        return sum(self.rewritten.values())

    @property
    def complete(self) -> bool:
        """Whether every piece of every aggregation looked at is in place now."""
        return not self.problems and not self.unreachable


def _fresh_pieces(coder: ErasureCoder, key: bytes, pieces: list[bytes | None],
                  key_matches: KeyCheck) -> list[bytes] | None:
    """Every piece of the record under ``key`` as it should be, None when fewer than k
    consistent pieces are left.

    The record is decoded from the data pieces (rebuilt from parity where missing); when
    that is not the record stored under the key (``key_matches``: by the hash its format
    names), every combination of k pieces is tried. The pieces are
    then encoded afresh from the checked record rather than rebuilt with
    `ErasureCoder.reconstruct`: the same bytes for a missing piece, and a corrupt piece
    that decoding did not need (parity, usually) shows up as different too.
    """
    def matches(record: bytes) -> bool:
        return key_matches(record, key)

    try:
        record = coder.decode(pieces)
    except ErasureError:
        record = None
    if record is None or not matches(record):
        try:
            record = coder.decode_verified(pieces, matches)
        except ErasureError:
            return None
    return coder.encode(record)


async def repair_vdisk(pool: StoragePool, vdisk_id: str, opener: RecordOpener, *,
                       scan: bool = True, dry_run: bool = False,
                       coder: ErasureCoder | None = None) -> RepairReport:
    """Rewrite the missing or corrupt pieces of a vdisk's aggregations.

    Looks at the aggregations the markers name and, with ``scan``, at every aggregation of
    the chain; with ``dry_run`` only reports. Also gives a server whose last-hash list is
    empty the chain's newest hashes (scan only), so it can tell the head again.
    """
    coder = coder or ErasureCoder(pool.k, pool.m)
    report = RepairReport(dry_run=dry_run)
    markers, _ = await find_markers(pool, vdisk_id)
    targets: dict[bytes, bool] = {key: True for key in markers}  # key -> named by a marker
    report.recorded = len(markers)
    chain: list[bytes] = []
    if scan:
        reader = ChainReader(pool, vdisk_id, opener, cache_bytes=0, workers=0)
        try:
            chain = [link.key for link in await reader.walk()]
        except DecodeError as exc:
            report.problems.append(f"cannot walk the chain: {exc}")
        for key in chain:
            if key not in targets:
                targets[key] = False
                report.scanned += 1
    unreachable: set[int] = set()
    keys = list(targets)
    for start in range(0, len(keys), BATCH):
        await _repair_batch(pool, vdisk_id, coder, keys[start:start + BATCH], targets,
                            markers, report, unreachable, dry_run, opener.key_matches)
    if scan and chain:
        await _restore_lists(pool, vdisk_id, chain, report, unreachable, dry_run)
    report.unreachable = sorted(unreachable)
    return report


async def _get_column(pool: StoragePool, index: int, keys: list[bytes],
                      unreachable: set[int]) -> list[bytes | None]:
    if index in unreachable:
        return [None] * len(keys)
    try:
        return await pool.servers[index].get_many(keys)
    except StorageError as exc:
        log.warning("cannot read from %s: %s", pool.servers[index].address, exc)
        unreachable.add(index)
        return [None] * len(keys)


async def _repair_batch(pool: StoragePool, vdisk_id: str, coder: ErasureCoder,
                        keys: list[bytes], targets: dict[bytes, bool],
                        markers: dict[bytes, set[int]], report: RepairReport,
                        unreachable: set[int], dry_run: bool, key_matches: KeyCheck) -> None:
    n = coder.n
    columns = await asyncio.gather(*(_get_column(pool, i, keys, unreachable)
                                     for i in range(n)))
    writes: dict[int, list[tuple[bytes, bytes]]] = {}
    done: list[bytes] = []  # every piece in place once the writes succeed
    for row, key in enumerate(keys):
        pieces = [columns[i][row] for i in range(n)]
        report.aggregations += 1
        if all(p is None for p in pieces):
            if unreachable:
                report.problems.append(f"aggregation {key.hex()}: no piece readable")
            else:
                log.info("aggregation %s is not stored at all: its marker is stale", key.hex())
                done.append(key)
            continue
        fresh = _fresh_pieces(coder, key, pieces, key_matches)
        if fresh is None:
            present = sum(p is not None for p in pieces)
            report.problems.append(f"aggregation {key.hex()}: only {present} piece(s) of "
                                   f"{n} readable and consistent, {coder.k} needed")
            continue
        for i in range(n):
            if i in unreachable or pieces[i] == fresh[i]:
                continue
            writes.setdefault(i, []).append((key, fresh[i]))
            if not targets[key]:
                report.found_by_scan += 1
        done.append(key)
    failed_servers: set[int] = set()
    for i, items in writes.items():
        if dry_run:
            report.rewritten[i] = report.rewritten.get(i, 0) + len(items)
            continue
        try:
            await pool.servers[i].set_many(items)
        except StorageError as exc:
            log.warning("cannot write to %s: %s", pool.servers[i].address, exc)
            unreachable.add(i)
            failed_servers.add(i)
            continue
        report.rewritten[i] = report.rewritten.get(i, 0) + len(items)
    if unreachable:
        # A server that could not be read or written may still miss its piece: keep the
        # markers so a later repair finds those aggregations at once.
        done = []
    if dry_run:
        return
    await _clear_markers(pool, vdisk_id, [k for k in done if k in markers], markers, report)


async def _clear_markers(pool: StoragePool, vdisk_id: str, keys: list[bytes],
                         markers: dict[bytes, set[int]], report: RepairReport) -> None:
    by_server: dict[int, list[bytes]] = {}
    for key in keys:
        for index in markers[key]:
            by_server.setdefault(index, []).append(marker_key(vdisk_id, key))
    for index, names in by_server.items():
        server = pool.servers[index]
        if not isinstance(server, RedisStorageServer):
            continue
        client = _client(server)
        try:
            report.markers_cleared += int(await client.delete(*names))
        except (redis.RedisError, OSError) as exc:
            log.warning("cannot delete markers on %s: %s", server.address, exc)
        finally:
            await client.aclose()


async def _restore_lists(pool: StoragePool, vdisk_id: str, chain: list[bytes],
                         report: RepairReport, unreachable: set[int], dry_run: bool) -> None:
    """Give servers with an empty last-hash list the chain's newest hashes (head last)."""
    list_key = last_hash_key(vdisk_id)
    newest = chain[-LAST_HASH_KEEP:]
    for index, server in enumerate(pool.servers):
        if index in unreachable:
            continue
        try:
            if await server.list_range(list_key):
                continue
            if not dry_run:
                await server.store([], list_key, newest)
        except StorageError as exc:
            log.warning("cannot restore the last-hash list on %s: %s", server.address, exc)
            unreachable.add(index)
            continue
        report.lists_restored.append(index)
