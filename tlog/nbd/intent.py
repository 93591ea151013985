"""The durable record of a served vdisk, kept with its blocks: where the device and the log
last agreed (`ExportState`), and which blocks may differ since (the intent log), so that a
start after any crash brings the two together again by looking at those blocks only
(docs/nbd.md, "After a crash").

Two grains, after md's write-intent bitmap and DRBD's activity log:

- **regions** (`REGION_BYTES`, 4 MiB): a region is marked *durably* before the first
  write into it is logged (file backend: a bit in the state file, then ``fdatasync``;
  Redis backend: ``SADD`` answered by the server), and unmarked lazily once every write
  into it is both stored in the log and synced on the device. A hot region stays marked
  and costs nothing more. After a crash of the machine these are what may differ.
- **blocks** (file backend only): a bit per block written, in the same file, mapped into
  memory and never synced (a store, no system call). They survive a crash of the process,
  not of the machine, and make its recovery exact. They live in two generations: each
  checkpoint starts the other one and clears the old once its writes are safe.

``mark`` comes before the write is logged, the checkpoint's clearing after the log has it
and the device is synced: whatever crashed when, a block that may differ is marked.

A crash of the process keeps the device's page cache, so block marks can go as soon as the
log has their writes, without syncing the device: a *light* checkpoint. Only region marks
need the device synced (a *full* checkpoint: a FLUSH, or a background one once more than
`HOT_REGIONS` regions are marked), as DRBD keeps its hot extents in the activity log.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import mmap
import os
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from tlog.holes import punch_hole
from tlog.storage.keys import nbd_regions_key, nbd_state_key

if TYPE_CHECKING:
    import numpy as np

#: Bytes of one region: the grain of the durable marks (DRBD's activity-log extent).
REGION_BYTES = 4 * 1024 * 1024
#: Regions a background checkpoint leaves marked without syncing the device (256 MiB):
#: what a recovery after a crash of the machine reads at most, beyond the regions written
#: since the last full checkpoint (DRBD's al-extents; its default is about 4.8 GiB).
HOT_REGIONS = 64
#: The state file's format, in its header slots.
MAGIC = b"TLOGNBD1"
_SLOT = 4096
_SLOT_HEAD = struct.Struct("<8sQII")  # magic, counter, length, crc32
_PAGE = 4096
#: Bitmap bytes scanned at a time when a recovery lists the marked blocks.
_SCAN = 1 << 20


class IntentError(Exception):
    """The state cannot be read or written (a message for the operator)."""


def boot_id() -> str:
    """This boot of the machine: a state left dirty under another one was left by a crash
    of the machine (its unsynced block marks are not to be trusted), not of the process."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as stream:
            return stream.read().strip()
    except OSError:
        return ""


@dataclass
class ExportState:
    """What an export's device holds, as far as the log is concerned.

    ``epoch``/``sequence``: the point of the log the device agreed with at the last
    checkpoint (``sequence`` -1: no log yet). ``clean``: the last run stopped cleanly, the
    device is exactly the log at that point; a running export is never clean. ``recovering``:
    a recovery started a new epoch (the log may be one epoch further than ``epoch``).
    """

    vdisk: str
    block_size: int
    size: int
    epoch: int = 0
    sequence: int = -1
    clean: bool = True
    boot_id: str = ""
    recovering: bool = False
    #: Recoveries this device went through, and what the last one did (for metrics).
    recoveries: int = 0
    last_recovery: dict[str, float] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        if self.sequence < 0:
            return f"epoch {self.epoch}, before any write"
        return f"epoch {self.epoch}, sequence {self.sequence}"

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> ExportState:
        try:
            fields = json.loads(data)
            names = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in fields.items() if k in names})
        except (ValueError, TypeError) as exc:
            raise IntentError(f"{where}: the tlog state is unreadable ({exc})") from None


def record_agreement(intent: IntentLog, vdisk: str, epoch: int, sequence: int) -> ExportState:
    """The device holds exactly the log at (``epoch``, ``sequence``) now (`tlog restore`
    wrote it): a clean state there, no mark. `tlog nbd` serves it as is when the log is
    still there, and refuses it when the log went on (a rolled-back image)."""
    intent.clear()
    state = ExportState(vdisk, intent.block_size, intent.size, epoch, sequence, clean=True)
    intent.save(state)
    return state


class IntentLog(abc.ABC):
    """The state and the marks of one export (see the module doc). Not thread-safe: the
    export calls `mark` under its write lock and runs one checkpoint at a time."""

    block_size: int
    size: int  # bytes
    region_blocks: int

    def __init__(self, block_size: int, size: int) -> None:
        self.block_size = block_size
        self.size = size
        self.blocks = size // block_size
        self.region_blocks = max(1, REGION_BYTES // block_size)
        self._shift = self.region_blocks.bit_length() - 1
        #: Regions marked durably, and the write (a counter) that last went into each.
        self._marked: set[int] = set()
        self._last: dict[int, int] = {}
        self._writes = 0

    # -- the state --
    @abc.abstractmethod
    def load(self) -> ExportState | None:
        """The state stored with the device; None when it has none."""

    @abc.abstractmethod
    def save(self, state: ExportState) -> None:
        """Store ``state`` durably."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the state is kept, for messages."""

    # -- marks --
    def mark(self, first: int, count: int) -> None:
        """Blocks ``first..first+count-1`` are about to be written: durable for their
        regions before this returns."""
        self._writes += 1
        write = self._writes
        shift = self._shift
        new = []
        for region in range(first >> shift, ((first + count - 1) >> shift) + 1):
            self._last[region] = write
            if region not in self._marked:
                new.append(region)
        self._mark_blocks(first, count)
        if new:
            self._mark_regions(new)
            self._marked.update(new)

    def begin_checkpoint(self) -> int:
        """The writes so far are about to be made safe (flushed in the log, synced on the
        device): later ones go to fresh marks. A token for `end_checkpoint`."""
        self._next_generation()
        return self._writes

    def needs_device_sync(self) -> bool:
        """Whether a background checkpoint must be full (sync the device, unmark regions):
        where blocks are not marked one by one, or once more than `HOT_REGIONS` are marked."""
        return not self._has_block_marks() or len(self._marked) > HOT_REGIONS

    def end_light_checkpoint(self) -> None:
        """The writes before `begin_checkpoint` are in the log, not yet synced on the
        device: their block marks go (a crash of the process keeps the page cache), their
        regions stay marked (a crash of the machine may not)."""
        self._clear_blocks_generation()

    def end_checkpoint(self, token: int) -> None:
        """The writes up to ``token`` are safe: their marks go, unless written again."""
        self._clear_blocks_generation()
        cold = [r for r in self._marked if self._last.get(r, 0) <= token]
        for region in cold:
            self._marked.discard(region)
            self._last.pop(region, None)
        if cold:
            self._unmark_regions(cold)

    def clear(self) -> None:
        """Every write is safe (a clean stop, the end of a recovery): no mark is left."""
        self._marked.clear()
        self._last.clear()
        self._clear_all()

    @property
    def marked_regions(self) -> int:
        return len(self._marked)

    @property
    def block_marks(self) -> bool:
        """Whether blocks are marked one by one (else a recovery takes whole regions)."""
        return self._has_block_marks()

    def dirty(self, whole_regions: bool) -> list[tuple[int, int]]:
        """The blocks that may differ between device and log, as sorted, merged
        ``(first, count)`` ranges: the marked blocks, or with ``whole_regions`` (after a
        crash of the machine, or where blocks are not marked) every block of each marked
        region."""
        if whole_regions or not self._has_block_marks():
            rb = self.region_blocks
            ranges = [(r * rb, rb) for r in sorted(self._stored_regions())]
        else:
            ranges = list(self._marked_blocks())
        return _merge_and_clip(ranges, self.blocks)

    # -- per backend --
    @abc.abstractmethod
    def _mark_regions(self, regions: list[int]) -> None: ...

    @abc.abstractmethod
    def _unmark_regions(self, regions: list[int]) -> None: ...

    @abc.abstractmethod
    def _stored_regions(self) -> Iterable[int]: ...

    @abc.abstractmethod
    def _clear_all(self) -> None: ...

    def _has_block_marks(self) -> bool:
        return False

    def _mark_blocks(self, first: int, count: int) -> None:  # noqa: B027 - optional
        pass

    def _next_generation(self) -> None:  # noqa: B027 - optional
        pass

    def _clear_blocks_generation(self) -> None:  # noqa: B027 - optional
        pass

    def _marked_blocks(self) -> Iterable[tuple[int, int]]:
        return ()

    def close(self) -> None:  # noqa: B027 - optional
        """Release what it holds."""


def _merge_and_clip(ranges: Iterable[tuple[int, int]], blocks: int) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for first, count in sorted(ranges):
        end = min(first + count, blocks)
        if end <= first:
            continue
        if out and first <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([first, end])
    return [(first, end - first) for first, end in out]


def _bitmap_bytes(bits: int) -> int:
    """Bytes of a bitmap of ``bits`` bits, in whole pages."""
    nbytes = (bits + 7) // 8
    return (nbytes + _PAGE - 1) // _PAGE * _PAGE


class FileIntentLog(IntentLog):
    """The state file of an image: two header slots (the newer valid one counts; a torn
    write of one leaves the other), the region bitmap, and two generations of block
    bitmaps, mapped into memory. Sparse: a 1 TiB vdisk of 4 KiB blocks has 64 MiB of block
    bitmaps, of which only what was written takes room."""

    def __init__(self, path: str, block_size: int, size: int) -> None:
        super().__init__(block_size, size)
        self.path = path
        self._regions_at = 2 * _SLOT
        self._gen_bytes = _bitmap_bytes(self.blocks)
        regions = (self.blocks + self.region_blocks - 1) // self.region_blocks
        self._blocks_at = self._regions_at + _bitmap_bytes(regions)
        self._length = self._blocks_at + 2 * self._gen_bytes
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise IntentError(f"cannot open the tlog state {path}: "
                              f"{exc.strerror or exc}") from None
        self._counter = 0
        self._map: mmap.mmap | None = None
        self._gen = 0
        #: Pages of each block generation written since it was last cleared.
        self._touched: tuple[set[int], set[int]] = (set(), set())

    def describe(self) -> str:
        return f"state file {self.path}"

    # -- header slots --
    def load(self) -> ExportState | None:
        best: tuple[int, bytes] | None = None
        for slot in (0, 1):
            raw = os.pread(self._fd, _SLOT, slot * _SLOT)
            if len(raw) < _SLOT_HEAD.size:
                continue
            magic, counter, length, crc = _SLOT_HEAD.unpack_from(raw)
            body = raw[_SLOT_HEAD.size:_SLOT_HEAD.size + length]
            if magic != MAGIC or len(body) != length or zlib.crc32(body) != crc:
                continue
            if best is None or counter > best[0]:
                best = (counter, body)
        if best is None:
            if os.fstat(self._fd).st_size:
                raise IntentError(f"{self.path}: not a tlog state file (or both of its "
                                  "header copies are damaged)")
            return None
        self._counter = best[0]
        state = ExportState.from_json(best[1], self.path)
        self._attach(state)
        return state

    def save(self, state: ExportState) -> None:
        body = state.to_json()
        if _SLOT_HEAD.size + len(body) > _SLOT:
            raise IntentError(f"{self.path}: the state does not fit its header slot")
        self._counter += 1
        slot = self._counter % 2
        raw = _SLOT_HEAD.pack(MAGIC, self._counter, len(body), zlib.crc32(body)) + body
        try:
            if self._map is None:
                self._attach(state)
            os.pwrite(self._fd, raw.ljust(_SLOT, b"\0"), slot * _SLOT)
            os.fdatasync(self._fd)
        except OSError as exc:
            raise IntentError(f"cannot write the tlog state {self.path}: "
                              f"{exc.strerror or exc}") from None

    def _attach(self, state: ExportState) -> None:
        """Map the bitmaps, laid out for this device's geometry."""
        if self._map is not None:
            return
        if (state.block_size, state.size) != (self.block_size, self.size) and not state.clean:
            raise IntentError(f"{self.path}: recorded for blocks of {state.block_size} and "
                              f"{state.size} bytes, not {self.block_size} and {self.size}: "
                              "change the geometry only after a clean stop")
        if os.fstat(self._fd).st_size != self._length:
            os.ftruncate(self._fd, self._regions_at)  # a clean state's old bitmaps go
            os.ftruncate(self._fd, self._length)
        self._map = mmap.mmap(self._fd, self._length)

    # -- marks --
    def _bit_set(self, base: int, first: int, count: int) -> None:
        m = self._map
        assert m is not None
        end = first + count
        while first < end and first & 7:
            m[base + (first >> 3)] |= 1 << (first & 7)
            first += 1
        whole = (end - first) >> 3
        if whole:
            at = base + (first >> 3)
            m[at:at + whole] = b"\xff" * whole
            first += whole * 8
        while first < end:
            m[base + (first >> 3)] |= 1 << (first & 7)
            first += 1

    def _bit_clear(self, base: int, index: int) -> None:
        m = self._map
        assert m is not None
        m[base + (index >> 3)] &= ~(1 << (index & 7)) & 0xFF

    def _mark_blocks(self, first: int, count: int) -> None:
        self._bit_set(self._blocks_at + self._gen * self._gen_bytes, first, count)
        touched = self._touched[self._gen]
        for page in range(first >> 15, ((first + count - 1) >> 15) + 1):
            touched.add(page)

    def _mark_regions(self, regions: list[int]) -> None:
        for region in regions:
            self._bit_set(self._regions_at, region, 1)
        os.fdatasync(self._fd)  # the block bits go along; only the regions must

    def _unmark_regions(self, regions: list[int]) -> None:
        for region in regions:
            self._bit_clear(self._regions_at, region)

    def _stored_regions(self) -> Iterable[int]:
        return _set_bits(self._view(self._regions_at, self._blocks_at - self._regions_at))

    def _has_block_marks(self) -> bool:
        return True

    def _next_generation(self) -> None:
        self._gen ^= 1

    def _clear_blocks_generation(self) -> None:
        old = self._gen ^ 1
        m = self._map
        assert m is not None
        base = self._blocks_at + old * self._gen_bytes
        zero = bytes(_PAGE)
        for page in self._touched[old]:
            at = base + page * _PAGE
            if at + _PAGE <= base + self._gen_bytes:
                m[at:at + _PAGE] = zero
        self._touched[old].clear()

    def _marked_blocks(self) -> Iterable[tuple[int, int]]:
        import numpy as np  # a recovery's need only: serving starts without it

        gens = [self._view(self._blocks_at + g * self._gen_bytes, self._gen_bytes)
                for g in (0, 1)]
        union = np.bitwise_or(gens[0], gens[1])
        return _runs(_set_bits(union))

    def _view(self, offset: int, length: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
        import numpy as np

        assert self._map is not None
        return np.frombuffer(self._map, dtype=np.uint8, count=length, offset=offset)

    def _clear_all(self) -> None:
        if self._map is None:
            return
        length = self._length - self._regions_at
        if not punch_hole(self._fd, self._regions_at, length):
            zero = bytes(_SCAN)
            for at in range(self._regions_at, self._length, _SCAN):
                n = min(_SCAN, self._length - at)
                self._map[at:at + n] = zero[:n]
        self._touched[0].clear()
        self._touched[1].clear()

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        os.close(self._fd)


def _set_bits(bitmap: np.ndarray[Any, np.dtype[np.uint8]]) -> Iterable[int]:
    """The indexes of the set bits of a bitmap (bit i: byte i // 8, bit i % 8), in order,
    looking only at its nonzero bytes."""
    import numpy as np

    for start in range(0, len(bitmap), _SCAN):
        chunk = bitmap[start:start + _SCAN]
        for byte in np.flatnonzero(chunk):
            value = int(chunk[byte])
            base = (start + int(byte)) * 8
            for bit in range(8):
                if value >> bit & 1:
                    yield base + bit


def _runs(indexes: Iterable[int]) -> Iterable[tuple[int, int]]:
    first = last = -2
    for i in indexes:
        if i == last + 1:
            last = i
            continue
        if first >= 0:
            yield first, last - first + 1
        first = last = i
    if first >= 0:
        yield first, last - first + 1


class RedisIntentLog(IntentLog):
    """The state of a Redis block store, in two keys beside its blocks (never a decimal
    index): ``<prefix>tlog:nbd`` (the state, JSON) and ``<prefix>tlog:nbd-regions`` (the
    marked regions). A mark is answered by the server before the write is logged; the
    server keeps commands in order, so its persistence keeps marks with the writes."""

    def __init__(self, client: redis.Redis, prefix: bytes, block_size: int, size: int,
                 where: str, on_save: Callable[[], None] | None = None) -> None:
        super().__init__(block_size, size)
        self._redis = client
        self._state_key = nbd_state_key(prefix)
        self._regions_key = nbd_regions_key(prefix)
        self._where = where
        self._on_save = on_save  # the backend learns that its state exists from now on

    def describe(self) -> str:
        return f"{self._where}, key {self._state_key.decode(errors='replace')}"

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except redis.RedisError as exc:
            raise IntentError(f"{self._where}: {what} the tlog state failed: {exc}") from None

    def load(self) -> ExportState | None:
        raw = self._call("reading", self._redis.get, self._state_key)
        if raw is None:
            return None
        return ExportState.from_json(raw, self.describe())

    def save(self, state: ExportState) -> None:
        self._call("writing", self._redis.set, self._state_key, state.to_json())
        if self._on_save is not None:
            self._on_save()

    def _mark_regions(self, regions: list[int]) -> None:
        self._call("marking", self._redis.sadd, self._regions_key, *regions)

    def _unmark_regions(self, regions: list[int]) -> None:
        self._call("unmarking", self._redis.srem, self._regions_key, *regions)

    def _stored_regions(self) -> Iterable[int]:
        members = self._call("reading", self._redis.smembers, self._regions_key)
        return sorted(int(m) for m in members)

    def _clear_all(self) -> None:
        self._call("clearing", self._redis.delete, self._regions_key)
