"""Re-encrypting a vdisk's log under the current master key, to retire old keys (`tlog rekey`).

After a key rotation tlogserver seals new aggregations with the new key and reads older ones
with the old keys it is given (each v2 record names its key id). To stop needing an old key,
every record sealed with it must be sealed again with the new one. A record's hash is its
storage key and the next record's ``prev``, so re-sealing one record changes every record
after it: the chain is rewritten from the first record that is not under the new key up to
the head. Records already under the new key before that point are kept as they are.

The rewrite never changes what the log says: each aggregation keeps its blocks (sequence,
index, data, timestamps) and its flush timestamp; only the nonce, the key id, the ``prev``
links and therefore the hashes change. It is done so that a crash at any point leaves a
readable log:

1. walk and open the whole chain (every record checked, as ``tlog verify`` does; a record
   whose key was not given stops everything, naming the key id);
2. seal and store the new records (all k+m pieces; nothing points at them yet);
3. check that no server's head moved meanwhile (a client wrote to the vdisk: stop), then
   push the new head onto every server's ``last_hash_<vdisk>`` list;
4. with ``--delete-old``, delete the replaced records (and keep only the new head in the
   lists).

The vdisk must not be written during a rekey: no client connected to it through any
tlogserver (a server releases an idle vdisk by itself; one that still holds it open would
keep chaining onto the old head). Step 3 catches writes that happen during the run. Running
it again finishes an interrupted run: a chain already under the new key is only checked, and
every server's list is made to point at its head.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tlog.record.aggregation import Aggregation, Keyring, RecordOpener, V2Writer
from tlog.record.erasure import ErasureCoder
from tlog.record.keying import V3_VERSION
from tlog.storage import StorageError, StoragePool
from tlog.storage.keys import LAST_HASH_KEEP, last_hash_key

from .chain import ChainReader
from .head import NoLog

__all__ = ["RekeyError", "RekeyReport", "rekey_vdisk"]

#: Bytes of new records sealed before their pieces are written (one MSET per server).
BATCH_BYTES = 8 * 1024 * 1024
BATCH_RECORDS = 64


class RekeyError(Exception):
    """The rekey cannot go on; nothing the log needs was changed before this was raised,
    unless the message says so."""


@dataclass
class RekeyReport:
    """What a rekey found and did."""

    vdisk: str
    new_key_id: int
    aggregations: int = 0
    #: key id (None: legacy record) -> aggregations sealed with it, before the rekey
    by_key: dict[int | None, int] = field(default_factory=dict)
    kept: int = 0  # already under the new key, before the first rewritten one
    rewritten: int = 0
    deleted: int = 0  # old records deleted (--delete-old)
    lists_updated: int = 0  # servers whose last-hash list now starts with the new head
    head: bytes | None = None  # the head of the chain after the rekey
    dry_run: bool = False
    seconds: float = 0.0

    def summary(self) -> str:
        keys = ", ".join(f"{'legacy' if k is None else f'{k:08x}'}: {n}"
                         for k, n in sorted(self.by_key.items(), key=lambda kv: str(kv[0])))
        verb = "would rewrite" if self.dry_run else "rewrote"
        text = (f"vdisk {self.vdisk}: {self.aggregations} aggregations (by key id: "
                f"{keys or 'none'}); {verb} {self.rewritten} under key id "
                f"{self.new_key_id:08x}, kept {self.kept}")
        if self.deleted:
            text += f", deleted {self.deleted} old records"
        if self.lists_updated and not self.dry_run:
            text += f", head set on {self.lists_updated} servers"
        return text + f" in {self.seconds:.2f} s"


def _needs_rewrite(agg: Aggregation, new_key_id: int) -> bool:
    return agg.format == "legacy" or agg.key_id != new_key_id


async def _heads(pool: StoragePool, vdisk_id: str) -> list[bytes | None]:
    """The first entry of every server's last-hash list; every server must answer."""
    async def one(index: int) -> bytes | None:
        entries = await pool.servers[index].list_range(last_hash_key(vdisk_id))
        return entries[0] if entries else None
    try:
        return list(await asyncio.gather(*(one(i) for i in range(len(pool.servers)))))
    except StorageError as exc:
        raise RekeyError(f"every storage server must be reachable for a rekey: {exc}") from None


async def _store(pool: StoragePool, coder: ErasureCoder,
                 records: Sequence[tuple[bytes, bytes]]) -> None:
    """Store the pieces of ``records`` ((hash, record)) on every server, one MSET each."""
    per_server: list[list[tuple[bytes, bytes]]] = [[] for _ in pool.servers]
    for key, record in records:
        for i, piece in enumerate(coder.encode(record)):
            per_server[i].append((key, piece))
    try:
        await asyncio.gather(*(server.set_many(items)
                               for server, items in zip(pool.servers, per_server, strict=True)))
    except StorageError as exc:
        raise RekeyError(f"storing re-encrypted records failed (the log is unchanged; run "
                         f"again): {exc}") from None


async def rekey_vdisk(pool: StoragePool, vdisk_id: str, opener: RecordOpener, new_key: bytes,
                      *, delete_old: bool = False, dry_run: bool = False,
                      version: int = V3_VERSION) -> RekeyReport:
    """Re-encrypt ``vdisk_id``'s chain under ``new_key``; see the module's description.

    ``opener`` must hold every key the chain was sealed with (and the legacy key and nonce
    if it holds 0-Disk records, which become records of ours). The records rewritten are
    of ``version`` (3, or 2 for a fleet that may roll back to a tlog without v3); those
    kept keep theirs. Raises `RekeyError` or `tlog.record.pieces.DecodeError`.
    """
    started = time.perf_counter()
    writer = V2Writer(new_key, vdisk_id, version)
    report = RekeyReport(vdisk_id, Keyring.of(new_key).ids[0], dry_run=dry_run)
    coder = ErasureCoder(pool.k, pool.m)
    heads_before = await _heads(pool, vdisk_id)
    reader = ChainReader(pool, vdisk_id, opener, coder=coder)
    prev = bytes(32)
    rewriting = False
    old_keys: list[bytes] = []
    batch: list[tuple[bytes, bytes]] = []
    batch_bytes = 0
    async for item in reader.items():
        agg = item.aggregation
        report.aggregations += 1
        key_id = agg.key_id if agg.format != "legacy" else None
        report.by_key[key_id] = report.by_key.get(key_id, 0) + 1
        if not rewriting and not _needs_rewrite(agg, report.new_key_id):
            report.kept += 1
            prev = agg.hash
            continue
        rewriting = True
        report.rewritten += 1
        old_keys.append(agg.hash)
        if dry_run:
            continue
        sealed = writer.seal(prev, agg.blocks, timestamp=agg.timestamp, epoch=agg.epoch)
        prev = sealed.hash
        batch.append((sealed.hash, sealed.record))
        batch_bytes += len(sealed.record)
        if batch_bytes >= BATCH_BYTES or len(batch) >= BATCH_RECORDS:
            await _store(pool, coder, batch)
            batch, batch_bytes = [], 0
    if batch:
        await _store(pool, coder, batch)
    if report.aggregations == 0:
        raise NoLog(vdisk_id)
    report.head = None if dry_run and rewriting else prev
    if dry_run:
        report.seconds = time.perf_counter() - started
        return report
    # The switch: only if nobody wrote to the vdisk meanwhile.
    if await _heads(pool, vdisk_id) != heads_before:
        raise RekeyError(f"vdisk {vdisk_id} was written to during the rekey: stop its clients "
                         "and run again (the log is unchanged; the records written so far "
                         "are unreferenced)")
    keep = 1 if delete_old else LAST_HASH_KEEP
    list_key = last_hash_key(vdisk_id)
    stale = [server for server, head in zip(pool.servers, heads_before, strict=True)
             if head != prev or (delete_old and rewriting)]
    try:
        await asyncio.gather(*(server.store([], list_key, [prev], keep) for server in stale))
    except StorageError as exc:
        raise RekeyError(f"setting the new head failed on some servers (both chains are "
                         f"readable; run again to finish): {exc}") from None
    report.lists_updated = len(stale)
    if delete_old and old_keys:
        try:
            await asyncio.gather(*(server.delete_many(old_keys) for server in pool.servers))
        except StorageError as exc:
            raise RekeyError(f"deleting the old records failed (the new chain is in place): "
                             f"{exc}") from None
        report.deleted = len(old_keys)
    report.seconds = time.perf_counter() - started
    return report
