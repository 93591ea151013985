"""Compaction: replace the oldest part of a vdisk's log by a checkpoint, then delete it.

The order of the work is what makes a crash harmless (docs/retention.md proves it step by
step; tests/test_retention.py kills `tlog compact` at random points). Every step runs with
the vdisk's compaction lease held (`tlog.retention.lock`), and an interrupted run is
finished or undone by the next one before it plans anything (`Compactor.resume`).

1. **plan**: walk the chain's headers, choose the cut (the policy, held back by pins, by
   consumers such as a standby, and never into the servers' last-hash lists). Nothing is
   written.
2. **journal**: ``tlog_compact_<vdisk>`` on every server names the aggregation the
   checkpoint will cover.
3. **build and store**: the checkpoint (`tlog.retention.build`), part by part; each part's
   hash is added to ``tlog_compact_parts_<vdisk>`` before its pieces are stored. A crash up
   to here leaves the chain as it was; the next run deletes the listed parts.
4. **register**: the last part's hash pushed onto ``tlog_checkpoints_<vdisk>`` on every
   server. From now on readers start from the checkpoint (one server listing it suffices:
   every part was stored before).
5. **delete**: the covered aggregations, oldest first, in batches; in each batch the other
   servers' pieces before server 0's, so the piece that holds the header (what a resumed
   run walks back by) goes last. A crash leaves a contiguous run of old aggregations that
   no reader needs; the next run walks back from the covered hash and deletes the rest.
6. **retire**: older checkpoints: parts first, the last part last, then their registration.
   Readers never reach them: the new checkpoint is met first on the walk back.
7. **finish**: the journal and its list of parts are deleted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from tlog.read.chain import ChainReader
from tlog.read.checkpoints import (
    CheckpointRef,
    checkpoint_parts,
    describe_time,
    registered_checkpoints,
)
from tlog.read.links import ChainLink
from tlog.record.aggregation import (
    SEAL_STEP,
    ZERO_HASH,
    RecordOpener,
    V2Writer,
)
from tlog.record.erasure import ErasureCoder
from tlog.record.pieces import DecodeError, PieceReader
from tlog.record.steps import run_stepped
from tlog.storage import StorageError, StoragePool, StorageServer
from tlog.storage.keys import (
    checkpoint_list_key,
    compaction_key,
    compaction_parts_key,
    marker_key,
)

from .build import BuildError, build_checkpoint
from .lock import LEASE_TTL, CompactionBusy, CompactionLock
from .pins import PinError, read_pins
from .policy import RetentionPolicy, first_kept, held_back

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Aggregations deleted per round trip.
DELETE_BATCH = 128


class CompactionError(Exception):
    """A compaction that cannot run or had to stop; the message says what state it left."""


@dataclass
class CompactionPlan:
    """What a compaction would do: the aggregations before the cut, oldest first."""

    vdisk_id: str
    records: list[ChainLink]
    kept: int  # aggregations kept after the cut
    kept_blocks: int
    base: CheckpointRef | None  # the checkpoint the log starts from now
    stored_factor: float  # stored bytes per record byte: (k+m)/k
    held_by: str | None = None  # what kept the cut from going further back

    @property
    def cut(self) -> ChainLink | None:
        return self.records[-1] if self.records else None

    @property
    def bytes_freed(self) -> int:
        return int(sum(link.size for link in self.records) * self.stored_factor)

    def describe(self) -> str:
        if not self.records:
            why = f" (held back by {self.held_by})" if self.held_by else ""
            return (f"vdisk {self.vdisk_id}: nothing to compact{why}; {self.kept} "
                    "aggregations kept")
        cut = self.records[-1]
        held = f"; held back by {self.held_by}" if self.held_by else ""
        return (f"vdisk {self.vdisk_id}: {len(self.records)} aggregations up to sequence "
                f"{cut.last_sequence} (epoch {cut.epoch}) would be replaced by a checkpoint, "
                f"freeing about {self.bytes_freed / 1e6:.1f} MB; {self.kept} aggregations "
                f"({self.kept_blocks} blocks) kept{held}")


@dataclass
class CompactionSummary:
    """What a compaction did."""

    vdisk_id: str
    records_deleted: int = 0
    bytes_freed: int = 0
    checkpoint: CheckpointRef | None = None
    checkpoint_blocks: int = 0
    checkpoint_deleted: int = 0
    checkpoint_ranges: int = 0  # range blocks (each a run of deleted blocks)
    checkpoints_retired: int = 0
    resumed: str | None = None  # what finishing an interrupted compaction did
    held_by: str | None = None
    seconds: float = 0.0

    def line(self) -> str:
        parts = []
        if self.resumed:
            parts.append(self.resumed)
        if self.checkpoint is None:
            held = f" (held back by {self.held_by})" if self.held_by else ""
            parts.append(f"vdisk {self.vdisk_id}: nothing to compact{held}")
        else:
            parts.append(f"compacted vdisk {self.vdisk_id}: {self.records_deleted} "
                         f"aggregations deleted, {self.bytes_freed / 1e6:.1f} MB freed; "
                         f"checkpoint of {self.checkpoint_blocks} live blocks "
                         f"({self.checkpoint_deleted} deleted"
                         + (f", {self.checkpoint_ranges} deleted ranges"
                            if self.checkpoint_ranges else "")
                         + f") at {self.checkpoint.describe()} is the oldest restorable point")
            if self.checkpoints_retired:
                parts.append(f"{self.checkpoints_retired} older checkpoint(s) retired")
            if self.held_by:
                parts.append(f"held back by {self.held_by}")
        parts.append(f"{self.seconds:.2f} s")
        return "; ".join(parts)


@dataclass
class _Journal:
    """What an unfinished compaction left: the aggregation its checkpoint covers. The
    parts it may have stored are listed apart (`compaction_parts_key`), each before it is
    stored."""

    covered: bytes
    started: int = field(default_factory=time.time_ns)

    def encode(self) -> bytes:
        return json.dumps({"covered": self.covered.hex(), "started": self.started}).encode()

    @classmethod
    def decode(cls, value: bytes) -> _Journal | None:
        try:
            data = json.loads(value)
            return cls(bytes.fromhex(data["covered"]), int(data["started"]))
        except (ValueError, KeyError, TypeError):
            return None


class Compactor:
    """Compacts one vdisk's log (see the module doc for the order of the work).

    ``writer`` seals the checkpoint (v3 or v2, the vdisk's master key); ``on_step(name)`` is
    called as each step starts and ``on_progress(done, total)`` while aggregations are
    deleted, for progress displays. Every storage server of the pool must be reachable.
    ``processes``: whether the replay may open records in forked worker processes (None:
    when it pays; tlogserver says False).
    """

    def __init__(self, pool: StoragePool, vdisk_id: str, opener: RecordOpener,
                 writer: V2Writer, *, timeout: float = 10.0,
                 on_step: Callable[[str], None] | None = None,
                 on_progress: Callable[[int, int], None] | None = None,
                 processes: bool | None = None, lease_ttl: float = LEASE_TTL) -> None:
        self.pool = pool
        self.vdisk_id = vdisk_id
        self.opener = opener
        self.writer = writer
        self.timeout = timeout
        self.on_step = on_step
        self.on_progress = on_progress
        self.processes = processes
        self.coder = ErasureCoder(pool.k, pool.m)
        self._servers = pool.servers
        self._lock = CompactionLock(pool, vdisk_id, ttl=lease_ttl)

    def _step(self, name: str) -> None:
        self._lock.check()
        log.info("compaction of %s: %s", self.vdisk_id, name)
        if self.on_step is not None:
            self.on_step(name)

    async def _everywhere(self, what: str, calls: Sequence[Awaitable[object]]) -> None:
        """Await one call per server; any failure stops the compaction (resumable)."""
        self._lock.check()
        results = await asyncio.gather(*calls, return_exceptions=True)
        for result in results:
            if isinstance(result, StorageError):
                raise CompactionError(f"vdisk {self.vdisk_id}: {what} failed ({result}); "
                                      "every storage server must be reachable. Run tlog "
                                      "compact again to finish: the log is readable as it "
                                      "is") from None
            if isinstance(result, BaseException):
                raise result

    # -- plan --

    async def plan(self, policy: RetentionPolicy, *, now_ns: int | None = None,
                   hold: Sequence[tuple[str, tuple[int, int]]] = ()) -> CompactionPlan:
        """Where the cut would be; writes nothing. ``hold``: (who, (epoch, sequence)) of
        consumers whose position must stay restorable (like pins)."""
        reader = ChainReader(self.pool, self.vdisk_id, self.opener, cache_bytes=0,
                             workers=0, timeout=self.timeout)
        try:
            links = await reader.walk()
        except DecodeError as exc:
            raise CompactionError(f"vdisk {self.vdisk_id}: cannot read the chain to plan a "
                                  f"compaction: {exc}") from None
        factor = (self.pool.k + self.pool.m) / self.pool.k
        records = [link for link in links if link.checkpoint is None]
        head = reader.head
        if head is not None and head.agg is not None and head.agg.format == "legacy":
            raise CompactionError(f"vdisk {self.vdisk_id} is written in 0-Disk's legacy "
                                  "format, whose tools cannot read a checkpoint: not "
                                  "compacting it")
        keep = first_kept(records, policy, time.time_ns() if now_ns is None else now_ns,
                          factor)
        held_by = None
        # The newest aggregations, those the last-hash lists name, stay: a writer continues
        # the chain from them and a reader finds the head through them.
        listed = {key for entries in (head.lists if head else []) for key in entries}
        for i, link in enumerate(records):
            if link.key in listed:
                if i < keep:
                    keep, held_by = i, "the servers' last-hash lists (the newest aggregations)"
                break
        try:
            pins = await read_pins(self.pool, self.vdisk_id, every=True)
        except PinError as exc:
            raise CompactionError(f"vdisk {self.vdisk_id}: {exc}") from None
        holders = [(f"pin {p.name!r} (sequence {p.sequence}, epoch {p.epoch})", p.position)
                   for p in pins] + list(hold)
        for who, position in holders:
            i = held_back(records, position)
            if i < keep:
                keep, held_by = i, who
        kept = records[keep:]
        return CompactionPlan(self.vdisk_id, records[:keep], len(kept),
                              sum(link.count for link in kept), reader.base, factor, held_by)

    # -- the whole run --

    async def compact(self, policy: RetentionPolicy, *, dry_run: bool = False,
                      hold: Sequence[tuple[str, tuple[int, int]]] = (),
                      now_ns: int | None = None) -> tuple[CompactionPlan, CompactionSummary]:
        """Finish an interrupted compaction, plan, and (unless ``dry_run``) run the plan,
        holding the vdisk's compaction lease throughout."""
        started = time.perf_counter()
        summary = CompactionSummary(self.vdisk_id)
        if dry_run:
            self._step("plan")
            plan = await self.plan(policy, hold=hold, now_ns=now_ns)
            summary.held_by = plan.held_by
            return plan, summary
        try:
            async with self._lock:
                summary.resumed = await self.resume()
                if summary.resumed is not None:
                    log.info("%s", summary.resumed)
                    if self.on_step is not None:
                        self.on_step(f"resumed: {summary.resumed}")
                self._step("plan")
                plan = await self.plan(policy, hold=hold, now_ns=now_ns)
                summary.held_by = plan.held_by
                if plan.records:
                    await self.run(plan, summary)
        except CompactionBusy as exc:
            raise CompactionError(str(exc)) from None
        summary.seconds = time.perf_counter() - started
        return plan, summary

    async def run(self, plan: CompactionPlan, summary: CompactionSummary) -> None:
        """Steps 2-8 for ``plan`` (with the lease held)."""
        cut = plan.cut
        assert cut is not None
        journal = _Journal(cut.key)
        self._step("journal")
        await self._everywhere("writing the journal", [
            server.set_many([(compaction_key(self.vdisk_id), journal.encode())])
            for server in self._servers])
        self._step("build")
        try:
            built = await build_checkpoint(
                self.pool, self.vdisk_id, self.opener, self.writer, plan.records, plan.base,
                self._store_part, timeout=self.timeout, processes=self.processes,
                check=self._lock.check)
        except BuildError as exc:
            await self._roll_back()
            raise CompactionError(str(exc)) from None
        try:
            pins = await read_pins(self.pool, self.vdisk_id, every=True)
        except PinError as exc:
            raise CompactionError(f"vdisk {self.vdisk_id}: {exc}; run again to finish") from None
        positions = [p.position for p in pins]
        if any(held_back(plan.records, pos) < len(plan.records) for pos in positions):
            await self._roll_back()  # a pin before the cut was added meanwhile
            raise CompactionError(f"vdisk {self.vdisk_id}: a pin before the cut was added "
                                  "during the compaction; nothing was deleted, run again")
        self._step("register")
        list_key = checkpoint_list_key(self.vdisk_id)
        await self._everywhere("registering the checkpoint", [
            server.list_push(list_key, built.key) for server in self._servers])
        summary.checkpoint = CheckpointRef(built.key, cut.key, built.sequence, built.epoch,
                                           built.timestamp, built.parts)
        summary.checkpoint_blocks = built.blocks
        summary.checkpoint_deleted = built.deleted
        summary.checkpoint_ranges = built.ranges
        self._step("delete")
        summary.records_deleted = await self._delete([link.key for link in plan.records])
        summary.bytes_freed = plan.bytes_freed
        self._step("retire")
        summary.checkpoints_retired = await self._retire(built.key)
        self._step("finish")
        await self._finish()

    # -- steps --

    async def _store_part(self, key: bytes, record: bytes) -> None:
        """Journal a checkpoint part, then store its pieces (step 4, one part)."""
        await self._everywhere("journalling a checkpoint part", [
            server.list_push(compaction_parts_key(self.vdisk_id), key)
            for server in self._servers])
        pieces = await run_stepped(self.coder.encode_in_steps(record))
        stores: list[asyncio.Future[None]] = []
        try:
            for server, piece in zip(self._servers, pieces, strict=True):
                stores.append(asyncio.ensure_future(server.set_many([(key, piece)])))
                if len(piece) > SEAL_STEP:
                    # Each server's request is packed and written as its task starts: one
                    # in each turn of the event loop, not six pieces of 4 MB at once.
                    await asyncio.sleep(0)
        except BaseException:
            for store in stores:
                store.cancel()
            raise
        await self._everywhere("storing the checkpoint", stores)

    async def _delete(self, keys: Sequence[bytes]) -> int:
        """Delete aggregations (and their missing-piece markers), oldest first; in each
        batch server 0's pieces (which `_walk_back` follows) last."""
        done = 0
        for start in range(0, len(keys), DELETE_BATCH):
            batch = list(keys[start:start + DELETE_BATCH])
            doomed = batch + [marker_key(self.vdisk_id, key) for key in batch]
            await self._everywhere("deleting aggregations", [
                server.delete_many(doomed) for server in self._servers[1:]])
            await self._everywhere("deleting aggregations", [
                self._servers[0].delete_many(doomed)])
            done += len(batch)
            if self.on_progress is not None:
                self.on_progress(done, len(keys))
        return done

    async def _walk_back(self, key: bytes) -> list[bytes]:
        """The stored records from ``key`` back, oldest first: what an interrupted delete
        step left. Stops at a record that no longer reads (server 0's piece goes last; a
        record whose piece 0 a degraded write never stored still reads) or the zero hash."""
        reader = PieceReader(self.pool, self.coder, self.timeout)
        found: list[bytes] = []
        try:
            while key != ZERO_HASH:
                got = await reader.header(key)
                if got is None:
                    break
                found.append(key)
                key = got[0].prev
        finally:
            await reader.close()
        found.reverse()
        return found

    async def _retire(self, keep: bytes) -> int:
        """Delete every registered checkpoint but ``keep``: parts, last part, listing."""
        list_key = checkpoint_list_key(self.vdisk_id)
        retired = 0
        for old in await registered_checkpoints(self.pool, self.vdisk_id):
            if old == keep:
                continue
            parts = await self._parts_of(old)
            await self._delete([key for key in parts if key != old] + [old])
            await self._everywhere("retiring an old checkpoint", [
                server.list_remove(list_key, old) for server in self._servers])
            retired += 1
        return retired

    async def _parts_of(self, last: bytes) -> list[bytes]:
        """The stored parts of the checkpoint whose last part is ``last``, oldest first."""
        reader = PieceReader(self.pool, self.coder, self.timeout)
        try:
            parts = await checkpoint_parts(reader, last)
        finally:
            await reader.close()
        if reader.down:  # a part not read could be left behind, unlisted
            down = ", ".join(self._servers[i].address for i in sorted(reader.down))
            raise CompactionError(f"vdisk {self.vdisk_id}: storage server(s) {down} "
                                  "unreachable; every one must be to compact")
        return [key for key, _length in parts]

    async def _read_everywhere(self, read: Callable[[StorageServer], Awaitable[T]]) -> list[T]:
        try:
            return list(await asyncio.gather(*(read(server) for server in self._servers)))
        except StorageError as exc:
            raise CompactionError(f"vdisk {self.vdisk_id}: a storage server is unreachable "
                                  f"({exc}); every one must be to compact") from None

    async def _journal(self) -> _Journal | None:
        key = compaction_key(self.vdisk_id)
        for value in await self._read_everywhere(lambda server: server.get(key)):
            journal = _Journal.decode(value) if value is not None else None
            if journal is not None:
                return journal
        return None

    async def _finish(self) -> None:
        """Step 8: the journal and its list of parts go."""
        await self._everywhere("deleting the journal", [
            server.delete_many([compaction_parts_key(self.vdisk_id),
                                compaction_key(self.vdisk_id)]) for server in self._servers])

    async def _roll_back(self) -> None:
        """Undo a run that did not register its checkpoint: every part it journalled."""
        key = compaction_parts_key(self.vdisk_id)
        listed = await self._read_everywhere(lambda server: server.list_range(key))
        parts = list(dict.fromkeys(bytes(k) for entries in listed for k in entries))
        await self._delete(parts)
        await self._finish()

    async def resume(self) -> str | None:
        """Finish (or undo) a compaction that was interrupted; what it did, None if none."""
        journal = await self._journal()
        if journal is None:
            return None
        self._step("resume")
        parts_key = compaction_parts_key(self.vdisk_id)
        parts = {bytes(k) for entries in await self._read_everywhere(
            lambda server: server.list_range(parts_key)) for k in entries}
        list_key = checkpoint_list_key(self.vdisk_id)
        listed = await self._read_everywhere(lambda server: server.list_range(list_key))
        # Registered on any server: its parts were all stored, readers may use it already.
        mine = next((bytes(k) for entries in listed for k in entries if bytes(k) in parts),
                    None)
        if mine is None:
            await self._roll_back()
            return (f"undid an interrupted compaction of vdisk {self.vdisk_id} (its checkpoint "
                    "was never registered)")
        await self._everywhere("registering the checkpoint", [
            server.list_push(list_key, mine)
            for server, entries in zip(self._servers, listed, strict=True)
            if mine not in entries])
        deleted = await self._delete(await self._walk_back(journal.covered))
        retired = await self._retire(mine)
        await self._finish()
        return (f"finished an interrupted compaction of vdisk {self.vdisk_id} ({deleted} "
                f"aggregations deleted, {retired} old checkpoint(s) retired, since "
                f"{describe_time(journal.started)})")
