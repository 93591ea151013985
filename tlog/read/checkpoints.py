"""A vdisk's checkpoints as a reader finds them, and the error of a read before them.

A checkpoint (written by `tlog compact`, see docs/retention.md) stands for the state of a
vdisk after the aggregation it ``covers``; the aggregations up to that one may be deleted.
Each storage server lists the checkpoints in ``tlog_checkpoints_<vdisk>`` by the hash of
their last part; a reader takes the union of the lists and reads each last part's header
(the covered hash, the sequence, the epoch). The walk back from the head then starts its
replay from the checkpoint whose covered hash it meets, when the read's bounds allow.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from dataclasses import dataclass

from tlog.record.pieces import DecodeError, PieceReader
from tlog.storage import StorageError, StoragePool
from tlog.storage.keys import checkpoint_list_key

from .limiter import Limiter
from .links import ChainLink

log = logging.getLogger(__name__)


class RetentionError(DecodeError):
    """A read asked for a point older than what the log still holds (compacted away):
    ``wanted`` names the point asked for, ``oldest`` the oldest one left."""

    def __init__(self, message: str, key: bytes | None = None, *, wanted: str = "",
                 oldest: CheckpointRef | None = None) -> None:
        super().__init__(message, key)
        self.wanted = wanted
        self.oldest = oldest


def describe_time(ns: int) -> str:
    """A block timestamp (ns) as UTC ISO 8601, to the second."""
    stamp = datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class CheckpointRef:
    """A registered checkpoint, from its last part's header (a hint until replayed)."""

    key: bytes  # the hash of its last part
    covered: bytes  # the newest aggregation it stands for
    sequence: int  # that aggregation's last sequence...
    epoch: int  # ...of this epoch
    timestamp: int  # the newest block timestamp it stands for (ns)
    parts: int

    def usable_for(self, limiter: Limiter) -> bool:
        """Whether a read with these bounds may start from this checkpoint: no start bound
        (the writes it folded are gone) and every end bound at or after it."""
        if limiter.start_seq or limiter.start_ts:
            return False
        return limiter.within_end(self.epoch, self.sequence, self.timestamp)

    def describe(self) -> str:
        """Where it stands, for messages: sequence, epoch, time."""
        epoch = f" of epoch {self.epoch}" if self.epoch else ""
        return f"sequence {self.sequence}{epoch} ({describe_time(self.timestamp)})"


async def registered_checkpoints(pool: StoragePool, vdisk_id: str) -> list[bytes]:
    """The union of the servers' checkpoint lists, newest first (unreachable servers are
    skipped: a checkpoint is registered on every server before anything is deleted)."""
    key = checkpoint_list_key(vdisk_id)

    async def one(index: int) -> list[bytes]:
        try:
            return await pool.servers[index].list_range(key)
        except StorageError as exc:
            log.warning("checkpoint list of %s unavailable on %s: %s", vdisk_id,
                        pool.servers[index].address, exc)
            return []

    seen: dict[bytes, None] = {}
    for entries in await asyncio.gather(*(one(i) for i in range(len(pool.servers)))):
        for entry in entries:
            seen.setdefault(bytes(entry), None)
    return list(seen)


async def find_checkpoints(pool: StoragePool, vdisk_id: str,
                           reader: PieceReader) -> list[CheckpointRef]:
    """The vdisk's readable checkpoints, newest first. One whose last part cannot be read
    is left out with a warning (the reader then needs the aggregations it covers)."""
    found: list[CheckpointRef] = []
    for key in await registered_checkpoints(pool, vdisk_id):
        got = await reader.header(key)
        if got is None:
            log.warning("vdisk %s: checkpoint %s cannot be read", vdisk_id, key.hex())
            continue
        head = got[0]
        mark = head.checkpoint
        if mark is None or head.vdisk_id != vdisk_id or mark.part != mark.parts - 1:
            log.warning("vdisk %s: %s is listed as a checkpoint but is not one's last part",
                        vdisk_id, key.hex())
            continue
        found.append(CheckpointRef(key, mark.covered, head.last_sequence, head.epoch,
                                   head.timestamp, mark.parts))
    found.sort(key=lambda ref: (ref.epoch, ref.sequence), reverse=True)
    return found


async def checkpoint_parts(reader: PieceReader, last: bytes) -> list[tuple[bytes, int]]:
    """(key, record length) of the parts of the checkpoint whose last part is ``last``,
    oldest first, as far back as they read (down to part 0 when all do)."""
    found: list[tuple[bytes, int, int]] = []  # newest first: key, length, part
    key = last
    while True:
        got = await reader.header(key)
        mark = got[0].checkpoint if got is not None else None
        if got is None or mark is None or (found and mark.part >= found[-1][2]):
            break
        found.append((key, got[1], mark.part))
        if mark.part == 0:
            break
        key = got[0].prev
    return [(key, length) for key, length, _ in reversed(found)]


def before_window(vdisk_id: str, limiter: Limiter, oldest: CheckpointRef,
                  cause: DecodeError) -> RetentionError:
    """The error of a read whose bounds lie before the retained log."""
    wanted = []
    if limiter.start_seq or limiter.end_seq:
        bound = "start" if limiter.start_seq else "end"
        wanted.append(f"{bound} sequence {limiter.start_seq or limiter.end_seq}")
    if limiter.start_ts or limiter.end_ts:
        bound = "start" if limiter.start_ts else "end"
        wanted.append(f"{bound} time {describe_time(limiter.start_ts or limiter.end_ts)}")
    what = " and ".join(wanted) or "this read"
    advice = ("a start bound cannot be replayed from a checkpoint; read without one"
              if limiter.start_seq or limiter.start_ts else "roll back to it or later")
    return RetentionError(f"vdisk {vdisk_id}: {what} is before the retained log (compacted): "
                          f"the oldest restorable point is {oldest.describe()}; {advice}",
                          cause.key, wanted=what, oldest=oldest)


def check_part(link: ChainLink, nxt: ChainLink, base: CheckpointRef | None) -> None:
    """On the walk back from ``link`` to ``nxt``: checkpoint parts are followed last part
    first, down to part 0, all of one checkpoint, and only from the covered hash; ``base``:
    ``nxt`` was reached as that checkpoint's last part."""
    mark = nxt.checkpoint
    if base is not None:
        if mark is None or mark.part != mark.parts - 1 or mark.covered != base.covered:
            raise DecodeError(f"checkpoint {base.key.hex()}: its last part is not what the "
                              "checkpoint list registered", base.key)
    elif link.checkpoint is not None:
        want = link.checkpoint
        if (mark is None or mark.part != want.part - 1 or mark.parts != want.parts
                or mark.covered != want.covered):
            raise DecodeError(f"checkpoint part {link.key.hex()}: its prev {nxt.key.hex()} "
                              f"is not part {want.part - 1} of the same checkpoint", link.key)
    elif mark is not None:
        raise DecodeError(f"aggregation {link.key.hex()}: its prev {nxt.key.hex()} is a "
                          "checkpoint part (only a checkpoint's covered hash may be)", link.key)


async def explain_missing(pool: StoragePool, vdisk_id: str, known: list[CheckpointRef],
                          exc: DecodeError) -> DecodeError:
    """``exc`` (a record a replay needed is unreadable), or what caused it when a compaction
    deleted it after the walk: a checkpoint registered since then (not in ``known``)."""
    now = await registered_checkpoints(pool, vdisk_id)  # never raises
    if set(now) - {ref.key for ref in known}:
        return DecodeError(f"vdisk {vdisk_id}: a compaction deleted aggregations this read "
                           f"needed while it ran ({exc}); read again: it starts from the new "
                           "checkpoint", exc.key)
    return exc
