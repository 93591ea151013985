"""Which blocks a read replays (`Limiter`: sequence, timestamp and epoch bounds) and
which sequences it has replayed already (`SequenceSet`).

Limiters are the reference's (protocol.md describes them): a start and an end, by sequence
and/or by block timestamp, 0 meaning unbounded, both bounds inclusive. A block is replayed
when every given bound holds. The walk back stops at the first aggregation (newest first)
whose first sequence is <= the start sequence, or whose oldest block timestamp is <= the
start timestamp; the replay stops after the first aggregation that holds a block past an
end bound. Both shortcuts assume the chain is in sequence and time order, which the server
guarantees apart from re-flushed duplicates.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from tlog.protocol.wire import Block
from tlog.record.aggregation import (
    Aggregation,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limiter:
    """Which blocks to replay: sequence and/or block-timestamp bounds, 0 = unbounded.

    Bounds are inclusive: a block is replayed when ``start <= value <= end`` for every bound
    given. The sequence and timestamp bounds combine (all must hold).

    Sequence bounds name a sequence of one ``epoch`` (None: the epoch of the chain's head,
    the vdisk's current numbering; `ChainReader` fills it in). A block's position is
    (its aggregation's epoch, its sequence), compared in that order: with an end bound the
    earlier epochs are replayed whole and the later ones not at all, with a start bound
    the other way round. A log of one epoch (every log the reference writes) reads as
    plain sequence bounds.
    """

    start_seq: int = 0
    end_seq: int = 0
    start_ts: int = 0
    end_ts: int = 0
    epoch: int | None = None

    def __post_init__(self) -> None:
        for name in ("start_seq", "end_seq", "start_ts", "end_ts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
        if self.epoch is not None and (isinstance(self.epoch, bool)
                                       or not isinstance(self.epoch, int) or self.epoch < 0):
            raise ValueError(f"epoch must be a whole number >= 0, got {self.epoch!r}")
        if self.end_seq and self.start_seq > self.end_seq:
            raise ValueError(f"start sequence {self.start_seq} is after end sequence "
                             f"{self.end_seq}")
        if self.end_ts and self.start_ts > self.end_ts:
            raise ValueError(f"start timestamp {self.start_ts} is after end timestamp "
                             f"{self.end_ts}")

    @property
    def unbounded(self) -> bool:
        """True when every block passes."""
        return not (self.start_seq or self.end_seq or self.start_ts or self.end_ts)

    @property
    def needs_block_times(self) -> bool:
        """True when the walk back must see block timestamps (decrypt as it goes)."""
        return self.start_ts > 0

    def _at_or_after_start(self, epoch: int, seq: int) -> bool:
        target = epoch if self.epoch is None else self.epoch
        return epoch > target or (epoch == target and seq >= self.start_seq)

    def _at_or_before_end(self, epoch: int, seq: int) -> bool:
        target = epoch if self.epoch is None else self.epoch
        return epoch < target or (epoch == target and seq <= self.end_seq)

    def accepts(self, block: Block, epoch: int = 0) -> bool:
        """Whether ``block`` (of an aggregation of ``epoch``) is inside every bound."""
        seq, ts = block.sequence, block.timestamp
        return ((not self.start_seq or self._at_or_after_start(epoch, seq))
                and (not self.end_seq or self._at_or_before_end(epoch, seq))
                and (not self.start_ts or ts >= self.start_ts)
                and (not self.end_ts or ts <= self.end_ts))

    def within_end(self, epoch: int, seq: int, ts: int) -> bool:
        """Whether a block at (``epoch``, ``seq``) written at ``ts`` is inside the end bounds."""
        return ((not self.end_seq or self._at_or_before_end(epoch, seq))
                and (not self.end_ts or ts <= self.end_ts))

    def walk_stops_at(self, first_sequence: int, oldest_block_ts: int | None,
                      epoch: int = 0) -> bool:
        """Whether aggregations older than this one can hold no block to replay.

        ``oldest_block_ts`` is None when the aggregation was not decrypted (v2 header only);
        the walk only asks with it when ``needs_block_times``.
        """
        if self.start_seq and not self._after_start(epoch, first_sequence):
            return True
        return bool(self.start_ts and oldest_block_ts is not None
                    and oldest_block_ts <= self.start_ts)

    def _after_start(self, epoch: int, seq: int) -> bool:
        target = epoch if self.epoch is None else self.epoch
        return epoch > target or (epoch == target and seq > self.start_seq)

    def passes_end(self, agg: Aggregation) -> bool:
        """Whether ``agg`` holds a block past an end bound (the replay stops after it)."""
        if self.end_seq and any(not self._at_or_before_end(agg.epoch, b.sequence)
                                for b in agg.blocks):
            return True
        return bool(self.end_ts and any(b.timestamp > self.end_ts for b in agg.blocks))

    def after_end(self, first_sequence: int, epoch: int = 0) -> bool:
        """Whether an aggregation starting at ``first_sequence`` is wholly past the end."""
        return bool(self.end_seq and not self._at_or_before_end(epoch, first_sequence))

    def before_start(self, last_sequence: int, epoch: int = 0) -> bool:
        """Whether an aggregation ending at ``last_sequence`` is wholly before the start."""
        return bool(self.start_seq and not self._at_or_after_start(epoch, last_sequence))


class SequenceSet:
    """A set of sequence numbers kept as sorted, merged inclusive ranges.

    A vdisk's sequences are nearly contiguous, so this stays a handful of ranges where a
    plain set would hold millions of integers.
    """

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        """Empty, or the set of these inclusive ranges (as `ranges` gives them)."""
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in sorted(ranges):
            if self._ends and start <= self._ends[-1] + 1:
                self._ends[-1] = max(self._ends[-1], end)
            else:
                self._starts.append(start)
                self._ends.append(end)

    @classmethod
    def of_ranges(cls, ranges: Iterable[tuple[int, int]]) -> SequenceSet:
        """The set of these inclusive ranges (as `ranges` gives them)."""
        return cls(ranges)

    def __len__(self) -> int:
        return sum(e - s + 1 for s, e in zip(self._starts, self._ends, strict=True))

    def __contains__(self, seq: object) -> bool:
        if not isinstance(seq, int):
            return False
        i = bisect.bisect_right(self._starts, seq) - 1
        return i >= 0 and seq <= self._ends[i]

    @property
    def max(self) -> int:
        """The highest sequence in the set, -1 when empty."""
        return self._ends[-1] if self._ends else -1

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The inclusive ranges, ascending."""
        return list(zip(self._starts, self._ends, strict=True))

    def add_new(self, sequences: list[int], low: int) -> None:
        """Add ``sequences``, all above `max` (``low`` is their minimum): a whole range at
        once when they are distinct and consecutive, as an aggregation's usually are."""
        high = max(sequences)
        if high - low + 1 != len(sequences) or len(set(sequences)) != len(sequences):
            for seq in sequences:
                self.add(seq)
            return
        if self._ends and self._ends[-1] + 1 == low:
            self._ends[-1] = high
        else:
            self._starts.append(low)
            self._ends.append(high)

    def add(self, seq: int) -> None:
        """Add one sequence, merging it with neighbouring ranges."""
        starts, ends = self._starts, self._ends
        if ends and ends[-1] + 1 == seq:  # the common case: the next sequence
            ends[-1] = seq
            return
        if not ends or seq > ends[-1] + 1:
            starts.append(seq)
            ends.append(seq)
            return
        i = bisect.bisect_right(starts, seq) - 1
        if i >= 0 and seq <= ends[i]:
            return
        joins_left = i >= 0 and ends[i] + 1 == seq
        joins_right = i + 1 < len(starts) and starts[i + 1] - 1 == seq
        if joins_left and joins_right:
            ends[i] = ends[i + 1]
            del starts[i + 1], ends[i + 1]
        elif joins_left:
            ends[i] = seq
        elif joins_right:
            starts[i + 1] = seq
        else:
            starts.insert(i + 1, seq)
            ends.insert(i + 1, seq)


class Replayed:
    """What a replay has applied so far: the current epoch and its sequences, to choose the
    blocks of the next aggregation (`select`)."""

    def __init__(self) -> None:
        self.applied = SequenceSet()  # sequences replayed in the current epoch
        self.epoch = 0
        self._epoch_seen = False

    def select(self, agg: Aggregation, limiter: Limiter
               ) -> tuple[list[Block], list[Block], bool]:
        """The blocks of ``agg`` to replay, those skipped as repeats, and whether ``agg``
        starts a new epoch.

        Within an epoch a sequence is replayed once, at its first occurrence: a later
        copy is a re-flush of the same write (`tlog.read.chain`'s module doc). A later epoch
        is a new numbering whose blocks are all replayed, over whatever came before.
        """
        mark = agg.checkpoint
        if mark is not None:
            # The live blocks at the checkpoint; once its last part is in, the replay goes on
            # as it would have after the aggregation the checkpoint covers.
            if mark.part == mark.parts - 1:
                self.epoch, self._epoch_seen = agg.epoch, True
                self.applied = SequenceSet.of_ranges(mark.applied)
            return list(agg.blocks), [], False
        new_epoch = False
        if agg.epoch > self.epoch:
            new_epoch = self._epoch_seen
            self.epoch = agg.epoch
            self.applied = SequenceSet()
        self._epoch_seen = True
        applied = self.applied
        blocks = agg.blocks
        if not blocks:
            return [], [], new_epoch
        if limiter.unbounded:
            sequences = [b.sequence for b in blocks]
            low = min(sequences)
            if low > applied.max:  # the common case: everything is new
                applied.add_new(sequences, low)
                return list(blocks), [], new_epoch
        chosen: list[Block] = []
        repeats: list[Block] = []
        epoch = agg.epoch
        for b in blocks:
            if not limiter.accepts(b, epoch):
                continue
            if b.sequence in applied:
                repeats.append(b)
                continue
            applied.add(b.sequence)
            chosen.append(b)
        return chosen, repeats, new_epoch
