"""Slave sync: one vdisk's stored aggregations applied to its standby block store, in
chain order, without ever holding up a FlushOK.

The flusher hands each stored batch over (`SlaveSyncer.stored`, a plain append). The
syncer's task applies them to the standby (`tlog.read.standby.StandbyStore`) in groups, one
script each with the new position (conditional on the old one), but only a batch that
chains onto the standby's position (its ``prev`` is the hash applied last). Anything
else (the syncer just started, the standby was down or its redis restarted, the queue
outgrew its byte budget and was dropped) is caught up **from the log**: a `ChainReader`
bounded to start after the position, which also proves that the position lies on the
vdisk's chain (otherwise the standby is cleared and rebuilt from the whole log). So memory
stays bounded and no aggregation is applied twice, out of order, or skipped.

WaitNbdSlaveSync (`verify`, `wait_applied`, then `end`): once the standby itself holds
everything flushed (its position key read back from it, not this syncer's memory of it),
sync of the vdisk ends for good, recorded in the standby's position, because the NBD server
now writes to the standby itself. A standby that lost its data (its redis restarted empty)
is noticed by that check, and by one every `PROBE_SECONDS` while nothing is written, and is
rebuilt from the log at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

from tlog.protocol.wire import Block
from tlog.read.chain import ChainReader
from tlog.read.checkpoints import RetentionError
from tlog.read.limiter import Limiter
from tlog.read.standby import StandbyError, StandbyStore, SyncPosition, new_blocks
from tlog.record.aggregation import ZERO_HASH, RecordOpener
from tlog.record.pieces import DecodeError
from tlog.storage import StorageError, StoragePool, StoragePoolFactory

from .config import ServerConfig
from .flusher import Batch
from .logs import ContextLogger
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

#: Blocks applied in one script, at most (and at least one aggregation's).
APPLY_BLOCKS = 1024
RETRY_MIN = 0.1
RETRY_MAX = 5.0
#: Hashes of aggregations applied, remembered for `wait_applied` and to drop queued copies.
RECENT = 4096
#: Seconds between two looks at an idle standby's position (one GET): a standby that lost
#: its data is rebuilt without waiting for the next write or WaitNbdSlaveSync.
PROBE_SECONDS = 5.0


@dataclass
class _Pending:
    hash: bytes
    prev: bytes
    epoch: int
    blocks: Sequence[Block]
    stored_at: float  # time.monotonic()
    size: int


class SlaveSyncer:
    """Keeps one vdisk's standby in step with its log; see the module doc."""

    def __init__(self, vdisk_id: str, store: StandbyStore, pool: StoragePool,
                 opener: RecordOpener, *, queue_bytes: int, workers: int = 2) -> None:
        self.vdisk_id = vdisk_id
        self.store = store
        self.pool = pool
        self.opener = opener
        self.queue_bytes = queue_bytes
        self.workers = workers
        self.log = ContextLogger(log, vdisk=vdisk_id)
        self.position: SyncPosition | None = None  # None: to be read from the standby
        self.ended = ""
        #: The newest aggregation known to be stored (None: unknown, read the log).
        self.log_head: bytes | None = None
        self.log_sequence = -1  # highest sequence stored in log_epoch
        self.log_epoch = 0
        self.error = ""  # why the standby is behind, while it is failing
        self.applied_blocks = 0
        self.caught_up_from_log = 0  # aggregations applied from the log, not the queue
        self.data_lost = 0  # times the standby was found to have lost what it held
        self._queue: deque[_Pending] = deque()
        self._queued = 0
        self._overflowed = False
        self._recent: deque[bytes] = deque(maxlen=RECENT)
        self._recent_set: set[bytes] = set()
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._behind_since: float | None = None

    # -- what the server calls --
    def start(self) -> None:
        self._wake.set()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"slave sync {self.vdisk_id}")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await self.store.close()

    def attach(self, head: bytes, epoch: int, last_sequence: int) -> None:
        """A flusher continues the chain after ``head`` (the vdisk was opened), whose
        epoch and last sequence are given (-1: an empty log)."""
        self.log_head = head
        self.log_epoch, self.log_sequence = epoch, last_sequence
        self._wake.set()

    def stored(self, batches: list[Batch]) -> None:
        """The flusher stored ``batches`` (in chain order): queue them, never wait."""
        if self.ended:
            return
        now = time.monotonic()
        for batch in batches:
            record = batch.record
            if record is None:
                continue
            self.log_head = record.hash
            if batch.epoch != self.log_epoch:
                self.log_epoch, self.log_sequence = batch.epoch, -1
            self.log_sequence = max(self.log_sequence, record.last_sequence)
            if self._overflowed:
                continue
            size = sum(len(b.data) for b in batch.blocks)
            if self._queued + size > self.queue_bytes and self._queue:
                # The standby is far behind: drop the copies, read the log when it is back.
                self.log.warning("slave sync: standby %s is more than %d bytes behind; "
                                 "it will catch up from the log", self.store.describe(),
                                 self.queue_bytes)
                self._queue.clear()
                self._queued = 0
                self._overflowed = True
                continue
            self._queue.append(_Pending(record.hash, batch.prev, batch.epoch, batch.blocks,
                                        now, size))
            self._queued += size
        self._wake.set()

    def applied(self, key: bytes) -> bool:
        """Whether the standby holds aggregation ``key`` (and everything before it)."""
        pos = self.position
        return (pos is not None and pos.hash == key) or key in self._recent_set

    async def wait_applied(self, key: bytes, timeout: float) -> bool:
        """Until the standby holds aggregation ``key``; False after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._wake.set()
        while not self.applied(key):
            left = deadline - loop.time()
            if left <= 0 or self._task is None or self._task.done():
                return False
            self._progress.clear()
            try:
                async with asyncio.timeout(left):
                    await self._progress.wait()
            except TimeoutError:
                return False
        return True

    async def holds(self, key: bytes) -> bool:
        """Whether the standby itself holds aggregation ``key``: its position read back from
        it (what WaitNbdSlaveSync trusts, not this syncer's memory of it). When it lost its
        data, the rebuild from the log starts. Raises StorageError (unreachable)."""
        return await self.verify() and self.position is not None and self.position.hash == key

    async def verify(self) -> bool:
        """Read the standby's position back from it: whether it still holds what this
        syncer last applied. When it does not (its redis restarted empty, or something else
        wrote it), nothing of what was applied counts any more: it is read again and, when
        gone, rebuilt from the log. Raises StorageError when the standby cannot be read."""
        if self.ended or self.position is None:
            return self.position is not None
        found = await self.store.position()
        expected = self.position  # (after the read: a group applied meanwhile counts)
        if expected is None or found == expected:
            return expected is not None
        if found is None:
            self.data_lost += 1
            self.log.warning("slave sync: standby %s lost its data (no position recorded, "
                             "it held %s): rebuilding it from the log", self.store.describe(),
                             expected.describe())
            self.error = "the standby lost its data: rebuilding it from the log"
        else:
            self.log.warning("slave sync: standby %s is at %s, not %s: reading it again",
                             self.store.describe(), found.describe(), expected.describe())
        self.position = None
        self._recent.clear()
        self._recent_set.clear()
        if self._behind_since is None:
            self._behind_since = time.monotonic()
        self._wake.set()
        return False

    async def end(self, reason: str) -> str | None:
        """Stop syncing for good and record why in the standby (it is the primary now).
        None when it is recorded; else why not, and syncing goes on."""
        await cancel_and_wait(self._task)
        self._task = None
        pos = self.position or SyncPosition(vdisk=self.vdisk_id)
        try:
            await self.store.record(replace(pos, ended=reason, applied_at=time.time_ns()))
        except (StorageError, StandbyError) as exc:
            self.log.warning("slave sync could not be ended: the standby %s: %s",
                             self.store.describe(), exc)
            self.position = None  # read it again
            self.start()
            return f"the standby could not record that it is the primary now: {exc}"
        self.ended = reason
        self._queue.clear()
        self._queued = 0
        self.log.info("slave sync ended (%s): the standby %s holds %s and is not synced any "
                      "more", reason, self.store.describe(), pos.describe())
        return None

    def gauges(self, now: float) -> dict[str, float]:
        """Applied position and lag, for /metrics."""
        pos = self.position
        if pos is None and self.error:
            lag_blocks = self.log_sequence + 1  # unknown, or being rebuilt: all of it
        elif pos is None:
            lag_blocks = sum(len(p.blocks) for p in self._queue)
        elif self.log_head is None or pos.hash == self.log_head:
            lag_blocks = 0
        elif pos.epoch == self.log_epoch:
            lag_blocks = max(0, self.log_sequence - pos.sequence)
        else:
            lag_blocks = self.log_sequence + 1
        if self._queue:
            oldest: float | None = self._queue[0].stored_at
        else:
            oldest = self._behind_since if lag_blocks else None
        return {
            "slave_applied_sequence": pos.sequence if pos is not None else -1,
            "slave_lag_blocks": lag_blocks,
            "slave_lag_seconds": 0.0 if oldest is None else max(0.0, now - oldest),
            "slave_failing": int(bool(self.error)),
            "slave_ended": int(bool(self.ended)),
            "slave_data_lost": self.data_lost,
        }

    # -- the task --
    async def _run(self) -> None:
        delay = RETRY_MIN
        while True:
            try:  # (asyncio.timeout: 3.11's wait_for may swallow a cancellation)
                async with asyncio.timeout(PROBE_SECONDS):
                    await self._wake.wait()
            except TimeoutError:  # nothing to do for a while: is the standby still there?
                try:
                    await self.verify()
                except (StorageError, StandbyError):
                    pass  # unreachable: found out at the next write, or the next look
                continue
            self._wake.clear()
            try:
                while await self._step():
                    self._progress.set()
                    delay = RETRY_MIN
            except Exception as exc:  # the standby or the log unreadable: retry, lose nothing
                if not isinstance(exc, StorageError | StandbyError | DecodeError | OSError):
                    self.log.exception("slave sync: unexpected error")
                if not self.error:
                    self.log.warning("slave sync: standby %s behind (retrying): %s",
                                     self.store.describe(), exc)
                self.error = str(exc)
                self.position = None  # unknown until read back (the EXEC may have run)
                if self._behind_since is None:
                    self._behind_since = time.monotonic()
                self._progress.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                self._wake.set()
                continue
            if self.error:
                self.log.info("slave sync: standby %s reachable again, at %s",
                              self.store.describe(), self._describe_position())
                self.error = ""
            self._progress.set()

    def _describe_position(self) -> str:
        return self.position.describe() if self.position is not None else "an unknown position"

    async def _step(self) -> bool:
        """Apply one group; False when there is nothing to do."""
        if self.ended:
            return False
        pos = self.position
        if pos is None:
            pos = await self._load_position()
            if pos is None:
                return False
        queue = self._queue
        while queue and self.applied(queue[0].hash):
            self._pop()
        if queue and queue[0].prev == pos.hash:
            await self._apply_queued(pos)
            return True
        if self._overflowed or queue or self.log_head is None or self.log_head != pos.hash:
            if await self._catch_up(pos):
                return True
            if queue:
                self.log.warning("slave sync: %d stored aggregation(s) do not follow the "
                                 "standby's position %s, and the log holds nothing after it",
                                 len(queue), pos.describe())
            return False  # until something new is stored
        self._behind_since = None
        return False

    async def _load_position(self) -> SyncPosition | None:
        pos = await self.store.position()
        if pos is not None and pos.vdisk and pos.vdisk != self.vdisk_id:
            raise StandbyError(f"standby {self.store.describe()} is synced from vdisk "
                               f"{pos.vdisk!r}, not {self.vdisk_id!r}: fix slave_prefix")
        if pos is not None and pos.ended:
            self.ended = pos.ended
            self.position = pos
            self.log.warning("slave sync of this vdisk ended before (%s): the standby %s is "
                             "not written; run `tlog slave-status --reset` to sync it again",
                             pos.ended, self.store.describe())
            return None
        if pos is None:
            pos = await self._start_afresh("no slave sync position recorded")
        else:
            self.log.info("slave sync: standby %s at %s", self.store.describe(), pos.describe())
        self._note(pos)
        return pos

    async def _start_afresh(self, why: str) -> SyncPosition:
        deleted = await self.store.clear()
        self._recent.clear()
        self._recent_set.clear()
        pos = SyncPosition(vdisk=self.vdisk_id)
        await self.store.record(pos)
        self.log.info("slave sync: standby %s rebuilt from the whole log (%s; %d stale "
                      "block key(s) deleted)", self.store.describe(), why, deleted)
        return pos

    def _note(self, pos: SyncPosition, hashes: Sequence[bytes] = ()) -> None:
        """The standby is at ``pos`` now, having applied ``hashes`` on the way."""
        self.position = pos
        for key in (*hashes, pos.hash):
            if len(self._recent) == self._recent.maxlen:
                self._recent_set.discard(self._recent[0])
            self._recent.append(key)
            self._recent_set.add(key)

    def _pop(self) -> _Pending:
        item = self._queue.popleft()
        self._queued -= item.size
        return item

    async def _apply_queued(self, pos: SyncPosition) -> None:
        blocks: list[Block] = []
        group: list[_Pending] = []
        queue = self._queue
        while queue and queue[0].prev == pos.hash:
            item = queue[0]
            if group and len(blocks) + len(item.blocks) > APPLY_BLOCKS:
                break
            fresh = new_blocks(item.blocks, item.epoch, pos)
            blocks += fresh
            pos = pos.after(fresh, item.hash, item.epoch)
            group.append(self._pop())
        try:
            await self.store.apply(blocks, pos)
        except BaseException:
            # Not applied (or not known to be): put the group back, in order.
            for item in reversed(group):
                queue.appendleft(item)
                self._queued += item.size
            raise
        self.applied_blocks += len(blocks)
        self._note(pos, [item.hash for item in group])

    async def _catch_up(self, pos: SyncPosition) -> int:
        """Apply what the log holds after ``pos`` (the queue is used again afterwards);
        returns the number of aggregations applied."""
        self._overflowed = False
        if self._behind_since is None:
            self._behind_since = time.monotonic()
        limiter = (Limiter() if pos.sequence < 0 and pos.hash == ZERO_HASH
                   else Limiter(start_seq=pos.sequence + 1, epoch=pos.epoch))
        reader = self._reader(limiter)
        try:
            links = await reader.walk()
            on_chain = pos.hash == ZERO_HASH or any(link.key == pos.hash for link in links) or (
                bool(links) and links[0].prev == pos.hash)
            why = "its position is not on the vdisk's chain"
        except RetentionError as exc:  # compacted past the standby: rebuild it
            on_chain, why = False, f"its position was compacted away ({exc})"
        if not on_chain:
            self.log.error("slave sync: the standby's position %s: %s", pos.describe(), why)
            pos = await self._start_afresh(why)
            self._note(pos)
            reader = self._reader(Limiter())
            links = await reader.walk()
        if self.log_head is None:
            self.log_head = links[-1].key if links else ZERO_HASH
        applied = 0
        blocks: list[Block] = []
        hashes: list[bytes] = []
        async for item in reader.items():
            agg = item.aggregation
            mark = item.checkpoint
            if mark is not None:
                # A part of the checkpoint the log starts from (compacted): all of it is
                # applied; once the last part is in, the standby is at the covered point.
                blocks += item.blocks
                base = reader.base
                if mark.part == mark.parts - 1 and base is not None:
                    pos = pos.at_checkpoint(mark.covered, base.epoch, base.sequence,
                                            base.timestamp)
            else:
                fresh = new_blocks(item.blocks, agg.epoch, pos)
                blocks += fresh
                pos = pos.after(fresh, agg.hash, agg.epoch)
            hashes.append(agg.hash)
            applied += 1
            if len(blocks) >= APPLY_BLOCKS:
                await self._apply_from_log(blocks, pos, hashes)
                blocks, hashes = [], []
        if hashes:
            await self._apply_from_log(blocks, pos, hashes)
        self.caught_up_from_log += applied
        if applied:
            self.log.info("slave sync: caught up %d aggregation(s) from the log, standby at %s",
                          applied, pos.describe())
        return applied

    def _reader(self, limiter: Limiter) -> ChainReader:
        return ChainReader(self.pool, self.vdisk_id, self.opener, limiter,
                           workers=self.workers, processes=False)

    async def _apply_from_log(self, blocks: list[Block], pos: SyncPosition,
                              hashes: list[bytes]) -> None:
        await self.store.apply(blocks, pos)
        self.applied_blocks += len(blocks)
        self._note(pos, hashes)


def start_syncers(cfg: ServerConfig, factory: StoragePoolFactory,
                  opener: RecordOpener) -> dict[str, SlaveSyncer]:
    """One started syncer per vdisk with a standby (``cfg.slave_targets``): a standby left
    behind by a restart catches up from the log without waiting for the vdisk's client."""
    syncers: dict[str, SlaveSyncer] = {}
    for vdisk_id, target in sorted(cfg.slave_targets.items()):
        store = StandbyStore(target, cfg.block_size)
        syncer = SlaveSyncer(vdisk_id, store, factory.pool_for(vdisk_id), opener,
                             queue_bytes=cfg.slave_sync_queue_bytes)
        syncers[vdisk_id] = syncer
        syncer.start()
        logging.getLogger("tlogserver").info("slave sync to %s", target.describe(),
                                             extra={"vdisk": vdisk_id})
    if not cfg.with_slave_sync and any(
            isinstance(e, dict) and e.get("slave_sync") for e in cfg.vdisk_access.values()):
        logging.getLogger("tlogserver").warning(
            "vdisks have slave_sync in the config, but --with-slave-sync is off: their "
            "standbys are not synced")
    return syncers


async def stop_syncers(syncers: Sequence[SlaveSyncer], wait: float) -> None:
    """Give the standbys up to ``wait`` seconds to take what is stored, then stop them
    (their position is recorded: they resume from it at the next start)."""
    waits = [s.wait_applied(s.log_head, wait) for s in syncers
             if not s.ended and s.log_head is not None]
    if waits:
        await asyncio.gather(*waits)
    for syncer in syncers:
        await syncer.stop()
