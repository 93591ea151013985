"""`tlog verify`'s reading of a chain: every aggregation and every piece checked, the
problems listed instead of raised."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from tlog.protocol.wire import Block
from tlog.record.aggregation import (
    RecordOpener,
)
from tlog.record.erasure import ErasureCoder
from tlog.record.identity import write_identity
from tlog.record.pieces import DecodeError
from tlog.storage import StoragePool

from .chain import ChainReader
from .checkpoints import CheckpointRef
from .fetch import open_checked

log = logging.getLogger(__name__)
#: Sequences whose writes verify remembers per epoch (8 bytes each), to tell re-flushed
#: copies from reused sequences.
VERIFY_IDENTITIES = 16_000_000


@dataclass
class Problem:
    """Something wrong with the chain; ``key`` names the aggregation, when there is one."""

    key: bytes | None
    message: str
    severity: str = "error"  # "error" (the log is damaged) or "warning" (redundancy is)

    def __str__(self) -> str:
        return f"{self.severity}: {self.message}"


@dataclass
class VerifyReport:
    """What `verify_chain` found."""

    aggregations: int = 0
    blocks: int = 0
    duplicates: int = 0  # blocks whose sequence came before in the same epoch
    #: ...of which re-flushed copies (the same write stored again: harmless)...
    copies: int = 0
    #: ...and reused sequences: a different write under a sequence already stored in the
    #: epoch. The restore keeps the first; the later write is lost (errors below).
    reused: int = 0
    #: (epoch, key of its first aggregation, its first sequence), in chain order
    epochs: list[tuple[int, bytes, int]] = field(default_factory=list)
    first_sequence: int | None = None  # of the last epoch
    last_sequence: int | None = None  # of the last epoch
    head: bytes | None = None
    problems: list[Problem] = field(default_factory=list)
    #: The checkpoint the chain starts from (after a compaction), its parts and blocks
    #: (the last write of every index it covers); they count in neither number above.
    checkpoint: CheckpointRef | None = None
    checkpoint_parts: int = 0
    checkpoint_blocks: int = 0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def sound(self) -> bool:
        return not self.errors


def _pieces_problem(key: bytes, missing: Sequence[int], corrupt: Sequence[int],
                    addresses: Sequence[str]) -> Problem | None:
    parts = []
    if missing:
        parts.append("missing on " + ", ".join(f"server {i} ({addresses[i]})" for i in missing))
    if corrupt:
        parts.append("corrupt on " + ", ".join(f"server {i} ({addresses[i]})" for i in corrupt))
    if not parts:
        return None
    return Problem(key, f"aggregation {key.hex()}: piece(s) {'; '.join(parts)} "
                        "(readable from parity)", "warning")


#: An identity slot never written (a real digest equal to it is changed in one byte).
_NO_WRITE = bytes(8)


class _Identities:
    """What each sequence of an epoch wrote (index, operation, timestamp, hash), for verify
    to tell a re-flushed copy from a reused sequence: an 8-byte digest per sequence, in one
    array by offset from the epoch's first sequence (sequences are nearly contiguous), for
    up to `VERIFY_IDENTITIES` sequences; the others are not compared."""


    def __init__(self) -> None:
        self._base: int | None = None
        self._buf = bytearray()

    @staticmethod
    def _digest(b: Block) -> bytes:
        digest = hashlib.blake2b(write_identity(b.index, b.operation, b.timestamp, b.hash),
                                 digest_size=8).digest()
        return digest if digest != _NO_WRITE else b"\x01" + digest[1:]

    def _offset(self, seq: int) -> int | None:
        if self._base is None:
            self._base = seq
        off = seq - self._base
        return off if 0 <= off < VERIFY_IDENTITIES else None

    def add(self, b: Block) -> None:
        off = self._offset(b.sequence)
        if off is None:
            return
        end = 8 * off + 8
        if len(self._buf) < end:
            self._buf.extend(bytes(max(end - len(self._buf), len(self._buf))))
        self._buf[end - 8:end] = self._digest(b)

    def compare(self, b: Block) -> bool | None:
        """True: the same write as the first of its sequence; False: another; None: unknown."""
        off = self._offset(b.sequence)
        if off is None or 8 * off + 8 > len(self._buf):
            return None
        known = bytes(self._buf[8 * off:8 * off + 8])
        return None if known == _NO_WRITE else known == self._digest(b)


async def verify_chain(pool: StoragePool, vdisk_id: str, opener: RecordOpener, *,
                       allow_gaps: bool = False,
                       coder: ErasureCoder | None = None) -> VerifyReport:
    """Check a vdisk's whole chain and every piece of it; never raises DecodeError.

    Errors (in chain order, oldest first): an aggregation that cannot be read or opened, a
    ``prev`` that is not stored, a block whose hash is wrong, a gap in the sequences (unless
    ``allow_gaps``), a last-hash entry that is not on the chain. Warnings: pieces missing or
    corrupt but rebuilt from parity, entries of last-hash lists that do not decode,
    re-flushed copies. Sequences reused for different data within one epoch are errors:
    the restore keeps the first write of each (docs/durability.md).
    """
    report = VerifyReport()
    addresses = [s.address for s in pool.servers]
    reader = ChainReader(pool, vdisk_id, opener, coder=coder, all_pieces=True)
    try:
        links = await reader.walk()
    except DecodeError as exc:
        report.problems.append(Problem(exc.key, str(exc)))
        return report
    head = reader.head
    assert head is not None
    report.head = head.agg.hash if head.agg is not None else None
    on_chain = {link.key for link in links}
    # Every entry of the last-hash lists must be on the chain: the newest aggregations are
    # all listed, so one that is not was cut off by a broken prev link (or a fork).
    for index, entries in enumerate(head.lists):
        for key in entries:
            if key in on_chain:
                continue
            on_chain.add(key)  # report it once
            message = head.errors.get(key)
            if message is None and head.tried.get(key) is None:
                try:
                    agg = open_checked(opener, (await reader.fetch(key)).record, key)
                    if agg.vdisk_id != vdisk_id:
                        message = f"belongs to vdisk {agg.vdisk_id!r}"
                except DecodeError as exc:
                    message = str(exc)
            if message is not None:
                report.problems.append(Problem(
                    key, f"last-hash entry {key.hex()} of server {index} ({addresses[index]}) "
                         f"does not decode: {message}", "warning"))
                continue
            report.problems.append(Problem(
                key, f"aggregation {key.hex()} is in the last-hash list of server {index} "
                     f"({addresses[index]}) but not on the chain from the head "
                     f"{(report.head or b'').hex()}: a prev link is broken or the chain forked"))
    high: int | None = None  # highest sequence so far, in the current epoch
    high_key: bytes | None = None
    seen = _Identities()  # what each sequence of the current epoch wrote
    try:
        async for item in reader.items():
            agg = item.aggregation
            problem = _pieces_problem(agg.hash, item.missing, item.corrupt, addresses)
            if problem is not None:
                report.problems.append(problem)
            mark = item.checkpoint
            if mark is not None:
                # A part of the checkpoint the chain starts from: the walk checked that the
                # parts are all there, of one checkpoint, in order; the blocks' hashes were
                # checked like any aggregation's.
                report.checkpoint_parts += 1
                report.checkpoint_blocks += len(agg.blocks)
                if mark.part == mark.parts - 1:
                    report.checkpoint = reader.base
                    assert reader.base is not None
                    # The writes it folded are known only by their sequence ranges.
                    report.epochs.append((agg.epoch, agg.hash, reader.base.sequence))
                    high, high_key = reader.base.sequence, agg.hash
                    report.first_sequence = None
                    seen = _Identities()
                continue
            report.aggregations += 1
            report.blocks += len(agg.blocks)
            report.duplicates += item.duplicates
            if not report.epochs or item.new_epoch:
                if report.epochs and agg.epoch <= report.epochs[-1][0]:
                    report.problems.append(Problem(agg.hash, f"aggregation {agg.hash.hex()}: "
                                                   f"epoch {agg.epoch} after epoch "
                                                   f"{report.epochs[-1][0]}"))
                report.epochs.append((agg.epoch, agg.hash, agg.first_sequence))
                high = high_key = report.first_sequence = None
                seen = _Identities()
            elif agg.epoch < report.epochs[-1][0]:
                report.problems.append(Problem(agg.hash, f"aggregation {agg.hash.hex()}: "
                                               f"epoch {agg.epoch} after epoch "
                                               f"{report.epochs[-1][0]}"))
            repeats = {id(b) for b in item.repeats}
            copies = reused = 0
            reused_seqs: list[int] = []
            for b in agg.blocks:
                if id(b) in repeats:
                    verdict = seen.compare(b)
                    if verdict is False:
                        reused += 1
                        reused_seqs.append(b.sequence)
                    else:
                        copies += 1
                else:
                    seen.add(b)
            report.copies += copies
            report.reused += reused
            if copies:
                report.problems.append(Problem(
                    agg.hash, f"aggregation {agg.hash.hex()}: {copies} block(s) stored "
                              f"before in epoch {agg.epoch} with the same content (a "
                              "re-flush after a crash; replayed once)", "warning"))
            if reused:
                shown = ", ".join(str(q) for q in reused_seqs[:8])
                report.problems.append(Problem(
                    agg.hash, f"aggregation {agg.hash.hex()}: {reused} sequence(s) of epoch "
                              f"{agg.epoch} reused for different data ({shown}"
                              f"{', ...' if reused > 8 else ''}): a restore keeps the first "
                              "write of each and drops these (a client restarted its "
                              "numbering on a server without epochs)"))
            if not agg.blocks:
                continue
            first, last = agg.first_sequence, agg.last_sequence
            if report.first_sequence is None:
                report.first_sequence = first
            if high is not None and first > high + 1 and not allow_gaps:
                report.problems.append(Problem(
                    agg.hash, f"aggregation {agg.hash.hex()}: sequences {high + 1}.."
                              f"{first - 1} are missing between it and the aggregation "
                              f"before it ({(high_key or b'').hex()})"))
            if high is None or last > high:
                high, high_key = last, agg.hash
            report.last_sequence = high
    except DecodeError as exc:
        report.problems.append(Problem(exc.key, str(exc)))
    report.problems.sort(key=lambda p: 0 if p.severity == "error" else 1)
    return report
