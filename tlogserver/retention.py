"""Retention in the daemon: each vdisk this server serves has its log measured (for
/metrics) and, when a retention policy applies to it (``--retention-*`` or the vdisk's
``retention`` entry), compacted every ``interval`` (docs/retention.md).

One `RetentionKeeper` per server runs one compaction at a time, on the event loop, over
storage connections of its own (`StoragePool.detached`), so the flushes never queue behind
it. With an etcd config only the vdisk's owner serves it, hence compacts it; the storage
lease (`tlog.retention.lock`) keeps any other compaction (a `tlog compact` run by hand)
apart. A standby of slave sync that is in step holds the cut back at its position, as a pin
does, so it keeps catching up from the log instead of being rebuilt.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from tlog.record.aggregation import RecordOpener, V2Writer
from tlog.record.pieces import DecodeError
from tlog.retention import (
    CompactionError,
    CompactionSummary,
    Compactor,
    LogSize,
    RetentionPolicy,
    compaction_marks,
    measure_log,
)
from tlog.storage import StorageError, StoragePool

from .flusher import Batch
from .slavesync import SlaveSyncer
from .stats import ServerStats
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

#: Seconds before a failed measurement or compaction of a vdisk is tried again.
RETRY_SECONDS = 60.0
#: Most seconds between two looks for compactions made by others (`tlog compact`).
SURVEY_SECONDS = 60.0


@dataclass
class VdiskLog:
    """What the keeper knows of one vdisk's log (exported as ``tlog_log_*{vdisk}``)."""

    size: LogSize | None = None  # None: not measured yet
    #: (hash, blocks, stored bytes) of the aggregations stored since the measurement in
    #: progress began: those after the head it found are added to what it counts.
    since: list[tuple[bytes, int, int]] | None = None
    next_run: float = 0.0  # monotonic time the policy is applied next
    last_compaction: float = 0.0  # wall clock of the last successful compaction (0: none)
    #: `compaction_marks` read just before the last measurement: when they change, someone
    #: compacted the log (`tlog compact` by hand) and it is measured again.
    marks: tuple[tuple[bytes, ...], bool] | None = None
    #: Measure again at the next look, without applying the policy.
    remeasure: bool = False

    def gauges(self, now: float) -> dict[str, float]:
        size = self.size or LogSize()
        oldest = size.oldest_restorable_ns
        return {
            "log_records": size.records,
            "log_bytes": size.stored_bytes,
            "log_oldest_restorable_age_seconds":
                max(0.0, time.time() - oldest / 1e9) if oldest else 0.0,
            "log_last_compaction_timestamp_seconds": self.last_compaction,
        }


class RetentionKeeper:
    """Measures and compacts the logs of the vdisks a server serves.

    ``served()`` gives the ids of the open vdisks; ``pool_for``, ``policy_for(vdisk)`` and
    ``holds(vdisk)`` (who must stay restorable: (name, (epoch, sequence)) pairs) are asked
    each time, so a config reload applies at once; ``writer_key`` seals checkpoints, as
    records of ``writer_version`` (3, or 2: the server's storage format). Every
    ``survey()`` seconds it looks (cheaply) whether someone else compacted a log it measured.
    """

    def __init__(self, stats: ServerStats, opener: RecordOpener, writer_key: bytes,
                 writer_version: int,
                 served: Callable[[], Iterable[str]],
                 pool_for: Callable[[str], StoragePool],
                 policy_for: Callable[[str], RetentionPolicy | None],
                 holds: Callable[[str], Sequence[tuple[str, tuple[int, int]]]],
                 survey: Callable[[], float] = lambda: SURVEY_SECONDS) -> None:
        self.stats = stats
        self.opener = opener
        self.writer_key = writer_key
        self.writer_version = writer_version
        self.served = served
        self.pool_for = pool_for
        self.policy_for = policy_for
        self.holds = holds
        self.survey = survey
        self._next_survey = 0.0
        self.logs: dict[str, VdiskLog] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    # -- what the server tells it --

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop; a compaction cut short here is finished by the next one (it is resumable)."""
        self._stopped = True
        task, self._task = self._task, None
        await cancel_and_wait(task)

    def opened(self, vdisk_id: str) -> None:
        """A vdisk is served (again): measure it, and apply its policy soon."""
        self.logs.setdefault(vdisk_id, VdiskLog())
        self._wake.set()

    def reconfigured(self) -> None:
        """Policies may have changed: apply them afresh."""
        for entry in self.logs.values():
            entry.next_run = 0.0
        self._wake.set()

    def stored(self, vdisk_id: str, batches: Sequence[Batch], factor: float) -> None:
        """Aggregations were stored: count them until the next measurement."""
        entry = self.logs.get(vdisk_id)
        if entry is None:
            return
        stored = [(b.record.hash, len(b.blocks), int(len(b.record.record) * factor))
                  for b in batches if b.record is not None]
        if entry.since is not None:
            entry.since.extend(stored)
        if entry.size is not None:
            _add(entry.size, stored)

    def gauges(self) -> Mapping[str, VdiskLog]:
        """The open vdisks' entries, for /metrics."""
        return {vdisk_id: self.logs[vdisk_id] for vdisk_id in self.served()
                if vdisk_id in self.logs}

    # -- the loop --

    async def _run(self) -> None:
        while not self._stopped:
            now = time.monotonic()
            if now >= self._next_survey:
                self._next_survey = now + self.survey()
                await self._look_for_compactions()
            due = []
            wait = self._next_survey - now
            for vdisk_id in sorted(self.served()):
                entry = self.logs.setdefault(vdisk_id, VdiskLog())
                if entry.size is None or entry.next_run <= now or entry.remeasure:
                    due.append(vdisk_id)
                else:
                    wait = min(wait, entry.next_run - now)
            for vdisk_id in due:
                try:
                    await self._tend(vdisk_id)
                except Exception:  # a bug must not end retention for every vdisk
                    log.exception("retention: unexpected error", extra={"vdisk": vdisk_id})
                    entry = self.logs[vdisk_id]
                    entry.next_run = time.monotonic() + RETRY_SECONDS
                    if entry.size is None:
                        entry.size = LogSize(complete=False)
            if due:
                continue  # look again: the work took time
            self._wake.clear()
            try:
                # (not asyncio.wait_for: in 3.11 it can swallow a cancellation that comes
                # as the event is set, and stop() would wait a whole round)
                async with asyncio.timeout(max(0.05, wait)):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _look_for_compactions(self) -> None:
        """Mark for measuring again the logs whose compaction marks changed since they
        were measured (a compaction made by hand), once that compaction is finished."""
        for vdisk_id in sorted(self.served()):
            entry = self.logs.get(vdisk_id)
            if entry is None or entry.marks is None or entry.remeasure:
                continue
            try:
                marks = await compaction_marks(self.pool_for(vdisk_id), vdisk_id)
            except (StorageError, DecodeError) as exc:
                log.debug("retention: cannot look for compactions: %s", exc,
                          extra={"vdisk": vdisk_id})
                continue
            if marks != entry.marks and not marks[1]:
                log.info("retention: the log was compacted by someone else: measuring it "
                         "again", extra={"vdisk": vdisk_id})
                entry.remeasure = True

    async def _tend(self, vdisk_id: str) -> None:
        """Compact ``vdisk_id`` if its policy is due, then measure it."""
        entry = self.logs[vdisk_id]
        entry.remeasure = False
        policy = self.policy_for(vdisk_id)
        now = time.monotonic()
        try:
            pool = self.pool_for(vdisk_id)
        except StorageError as exc:  # the storage map moved it away meanwhile
            log.debug("retention: %s", exc, extra={"vdisk": vdisk_id})
            entry.next_run = now + RETRY_SECONDS
            return
        side = pool.detached()
        try:
            done: CompactionSummary | None = None
            if policy is not None and entry.next_run <= now:
                entry.next_run = now + policy.interval
                done = await self._compact(vdisk_id, side, policy, entry)
            elif policy is None:
                # Measured once; the stored aggregations are counted up from then on (a walk
                # of a log nothing compacts grows with it: not something to repeat).
                entry.next_run = math.inf
            entry.since = []
            try:
                entry.marks = await compaction_marks(side, vdisk_id)
                measured = await measure_log(side, vdisk_id, self.opener)
                since = entry.since
                heads = [i for i, (key, _, _) in enumerate(since) if key == measured.head]
                _add(measured, since[heads[-1] + 1:] if heads else since)
                entry.size = measured
            except (DecodeError, StorageError) as exc:
                log.warning("retention: cannot measure the log: %s", exc,
                            extra={"vdisk": vdisk_id})
                entry.next_run = min(entry.next_run, now + RETRY_SECONDS)
                if entry.size is None:
                    entry.size = LogSize(complete=False)
            finally:
                entry.since = None
            if done is not None and policy is not None:
                # Logged once the metrics show the log as it is now.
                log.info("retention (%s): %s", policy.describe(), done.line(),
                         extra={"vdisk": vdisk_id})
        finally:
            await side.close()

    async def _compact(self, vdisk_id: str, pool: StoragePool, policy: RetentionPolicy,
                       entry: VdiskLog) -> CompactionSummary | None:
        """One compaction; its summary when it compacted something."""
        writer = V2Writer(self.writer_key, vdisk_id, self.writer_version)
        compactor = Compactor(pool, vdisk_id, self.opener, writer, processes=False)
        try:
            _plan, summary = await compactor.compact(policy, hold=self.holds(vdisk_id))
        except (CompactionError, DecodeError, StorageError) as exc:
            self.stats.compaction_ran("failed")
            log.warning("retention: compaction failed, tried again in %gs: %s",
                        min(policy.interval, RETRY_SECONDS), exc, extra={"vdisk": vdisk_id})
            entry.next_run = time.monotonic() + min(policy.interval, RETRY_SECONDS)
            return None
        if summary.checkpoint is None:
            self.stats.compaction_ran("nothing")
            log.debug("retention (%s): %s", policy.describe(), summary.line(),
                      extra={"vdisk": vdisk_id})
            return None
        self.stats.compaction_ran("ok")
        self.stats.compacted_records += summary.records_deleted
        self.stats.compacted_bytes += summary.bytes_freed
        entry.last_compaction = time.time()
        return summary


def _add(size: LogSize, stored: Sequence[tuple[bytes, int, int]]) -> None:
    """Count aggregations stored after ``size`` was measured."""
    for _key, blocks, stored_bytes in stored:
        size.records += 1
        size.blocks += blocks
        size.stored_bytes += stored_bytes
        if size.oldest_restorable_ns is None:
            size.oldest_restorable_ns = time.time_ns()


def standby_holds(syncer: SlaveSyncer | None) -> list[tuple[str, tuple[int, int]]]:
    """Who must stay restorable in a vdisk's log besides its pins: its standby of slave
    sync while in step (one that fails or ended is rebuilt from the checkpoint instead of
    holding the log back for ever)."""
    if syncer is None or syncer.ended or syncer.error:
        return []
    pos = syncer.position
    if pos is None or pos.sequence < 0:
        return []
    return [(f"the standby of slave sync ({pos.describe()})", (pos.epoch, pos.sequence))]
