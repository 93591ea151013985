"""The client's unflushed blocks: every block sent and not yet answered FlushOK, kept as its
encoded frame (the client's only copy of the data) until then, and which of them still wait
for RecvOK. The bookkeeping of `tlog.client.tlogclient.TlogClient`, without its I/O, as
0-Disk's Go client keeps its ``tlogclient/blockbuffer`` apart."""

from __future__ import annotations

from collections.abc import Iterable


class UnflushedBuffer:
    """Frames by sequence, their byte count, and the write time of those without RecvOK
    (``awaiting``: insertion order is write order, so the oldest come first)."""

    __slots__ = ("frames", "size", "awaiting", "_low")

    def __init__(self, low: int = 0) -> None:
        self.frames: dict[int, bytes] = {}
        #: Bytes of the frames held: what the client's bound counts.
        self.size = 0
        #: sequence -> loop time of its last write, for blocks without RecvOK.
        self.awaiting: dict[int, float] = {}
        self._low = low  # <= the lowest sequence held, while any

    def __len__(self) -> int:
        return len(self.frames)

    def __contains__(self, sequence: int) -> bool:
        return sequence in self.frames

    def room_for(self, nbytes: int, limit: int) -> bool:
        """Whether a frame of ``nbytes`` fits under ``limit`` (an empty buffer takes any)."""
        return not self.frames or self.size + nbytes <= limit

    def put(self, sequence: int, frame: bytes) -> None:
        """Hold ``frame`` until FlushOK (replacing a frame of the same sequence)."""
        frames = self.frames
        old = frames.pop(sequence, None)
        if old is not None:
            self.size -= len(old)
            self.awaiting.pop(sequence, None)
        elif not frames or sequence < self._low:
            self._low = sequence
        frames[sequence] = frame
        self.size += len(frame)

    def lowest(self) -> int | None:
        """The lowest sequence held, None when every block is flushed."""
        frames = self.frames
        if not frames:
            return None
        low = self._low
        if low in frames:
            return low
        limit = low + len(frames) + 64
        low += 1
        while low not in frames:
            low += 1
            if low > limit:  # sequences with big gaps: just look
                low = min(frames)
                break
        self._low = low
        return low

    # -- what the server answers --
    def received(self, sequences: Iterable[int]) -> None:
        """RecvOK: no resend needed."""
        awaiting = self.awaiting
        for s in sequences:
            awaiting.pop(s, None)

    def flushed(self, sequences: Iterable[int]) -> tuple[int, int]:
        """FlushOK: the blocks go (twice, or one not held: ignored). (blocks, bytes) freed."""
        frames, awaiting = self.frames, self.awaiting
        count = freed = 0
        for s in sequences:
            frame = frames.pop(s, None)
            if frame is not None:
                freed += len(frame)
                count += 1
                awaiting.pop(s, None)
        self.size -= freed
        return count, freed

    def refused(self, sequences: Iterable[int], now: float) -> None:
        """RecvFailed: sent again once the resend timeout passes from ``now``."""
        frames, awaiting = self.frames, self.awaiting
        for s in sequences:
            if s in frames:
                awaiting.pop(s, None)
                awaiting[s] = now

    # -- writing --
    def written(self, sequence: int, now: float) -> None:
        """The block's frame went out at ``now``: it waits for RecvOK."""
        self.awaiting[sequence] = now

    def rewrite_all(self, now: float) -> list[bytes]:
        """Every frame, in sequence order, for a new connection; all wait for RecvOK."""
        awaiting = self.awaiting
        awaiting.clear()
        frames = []
        for seq in sorted(self.frames):
            awaiting[seq] = now
            frames.append(self.frames[seq])
        return frames

    def connection_lost(self) -> None:
        """Nothing waits for RecvOK on a connection that is gone (all go out again)."""
        self.awaiting.clear()

    def expired(self, written_before: float) -> list[int]:
        """The sequences still without RecvOK that were written before ``written_before``,
        oldest first."""
        out = []
        for seq, sent in self.awaiting.items():
            if sent > written_before:
                break
            out.append(seq)
        return out

    def resend(self, sequences: list[int], now: float) -> list[bytes]:
        """The frames of ``sequences`` (sorted here) to write again at ``now``; those flushed
        meanwhile are dropped from ``awaiting``."""
        sequences.sort()
        frames, awaiting = self.frames, self.awaiting
        out = []
        for seq in sequences:
            awaiting.pop(seq, None)
            frame = frames.get(seq)
            if frame is not None:
                awaiting[seq] = now
                out.append(frame)
        return out
