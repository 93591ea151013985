"""Replaying a vdisk's log into block storage: restore, roll back to a sequence or a time.

The player takes the blocks the decoder selects (`tlog.read.chain.ChainReader`: checked,
oldest first, each sequence once) and applies them to a `BlockStorage`: a ``set`` writes
the block's data at ``index x block_size``, a ``delete`` makes the block read as zeroes.
A callback hears of every applied sequence, so a caller can record how far it got.

Two storages: `FileBlockStorage`, a raw disk image written sparsely (a block never written
stays a hole), and `RedisBlockStorage`, one Redis key per block index, the layout a block
server keeping its blocks in Redis reads.
"""

from __future__ import annotations

import abc
import contextlib
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff

from tlog.holes import can_punch, punch_hole
from tlog.protocol.ranges import RangeError, range_count
from tlog.protocol.status import Operation
from tlog.protocol.wire import Block, Buffer
from tlog.record.aggregation import RecordOpener
from tlog.storage import ServerAddress, StoragePool
from tlog.storage.blockstore import (
    DELETE_BATCH,
    RANGE_KEYS_MAX,
    batches,
    block_key,
    block_keys,
    in_range,
    scan_pattern,
)

from .chain import ChainReader
from .checkpoints import CheckpointRef
from .limiter import Limiter
from .links import ChainItem

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "BlockStorage",
    "FileBlockStorage",
    "PlayResult",
    "Player",
    "PlayerError",
    "RedisBlockStorage",
    "restore",
]

DEFAULT_BLOCK_SIZE = 4096
#: Most buffers handed to one pwritev (Linux's IOV_MAX is 1024).
_MAX_IOV = 512
#: Bytes of zeroes written at a time where holes cannot be punched.
_ZERO_STEP = 1 << 20
_SET = int(Operation.SET)
_DELETE = int(Operation.DELETE)
_DELETE_RANGE = int(Operation.DELETE_RANGE)


class PlayerError(Exception):
    """A block that cannot be applied (bad index, oversized data, unknown operation), or a
    storage that failed; the message names the block or the storage."""


class BlockStorage(abc.ABC):
    """Where replayed blocks go. Block ``i`` covers bytes ``[i * block_size, (i+1) *
    block_size)``; a block never set, or deleted, reads as zeroes."""

    block_size: int

    def _check(self, block: Block) -> int:
        """The blocks ``block`` touches (a range's count, else 1); PlayerError for one that
        cannot be applied."""
        if block.index < 0:
            raise PlayerError(f"sequence {block.sequence}: negative block index {block.index}")
        if block.operation == Operation.SET and len(block.data) > self.block_size:
            raise PlayerError(f"sequence {block.sequence}: {len(block.data)} bytes of data do not "
                              f"fit a block of {self.block_size} bytes (wrong --block-size?)")
        if block.operation == _DELETE_RANGE:
            try:
                return range_count(block.index, block.data)
            except RangeError as exc:
                raise PlayerError(f"sequence {block.sequence}: {exc}") from None
        if block.operation not in (Operation.SET, Operation.DELETE):
            raise PlayerError(f"sequence {block.sequence}: unknown operation {block.operation}")
        return 1

    def _padded(self, data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
        """Data shorter than a block is completed with zeroes."""
        if len(data) == self.block_size:
            return data
        return bytes(data) + bytes(self.block_size - len(data))

    @abc.abstractmethod
    async def apply(self, blocks: Sequence[Block]) -> None:
        """Apply ``blocks`` in order (a later block on the same index wins)."""

    @abc.abstractmethod
    async def read(self, index: int) -> bytes:
        """The current content of block ``index`` (zeroes when never set or deleted)."""

    async def flush(self) -> None:
        """Make what was applied durable (where the storage can)."""
        return None

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish writing and release the storage; idempotent."""

    def describe(self) -> str:
        """Where the blocks go, for messages."""
        return type(self).__name__


# ---------------------------------------------------------------------------------------------
# Disk image file


def _is_plain_file(path: str) -> bool:
    """A regular file, not a symlink, a device or a directory."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _device_size(fd: int) -> int:
    """The bytes of a block device (0 for a character device such as /dev/null)."""
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    except OSError:
        return 0


class FileBlockStorage(BlockStorage):
    """A raw disk image. Writes go straight to their offset (pwrite, adjacent blocks in one
    pwritev); blocks never written stay holes. A deleted block becomes a hole too when the
    file system can punch one, zeroes otherwise. At close the file is extended to cover
    every block touched, so a trailing deleted block still reads as zeroes.

    ``truncate`` (the default) starts from an empty image; without it the blocks are applied
    onto the file's current content (replaying a later range onto an earlier restore). A
    block device is written in place: blocks the log does not touch keep their content.
    ``size``, when given, is the image size to end with (at least).
    """

    def __init__(self, path: str | os.PathLike[str], block_size: int = DEFAULT_BLOCK_SIZE, *,
                 truncate: bool = True, size: int = 0, sync: bool = False) -> None:
        if block_size < 1:
            raise ValueError(f"block size must be >= 1, got {block_size}")
        self.path = os.fspath(path)
        self.block_size = block_size
        flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if truncate else 0)
        try:
            if truncate and _is_plain_file(self.path):
                # A new file rather than the old one truncated: ext4 (auto_da_alloc) writes
                # a truncated file back synchronously when it is closed, a second or more
                # for a large image.
                os.unlink(self.path)
            self._fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise PlayerError(f"cannot open {self.path}: {exc.strerror or exc}") from None
        info = os.fstat(self._fd)
        # A block device (or /dev/null) cannot be truncated or punched: deleted blocks are
        # written as zeroes there, up to its end (a range may reach past it).
        self._regular = stat.S_ISREG(info.st_mode)
        self._size = info.st_size if self._regular else _device_size(self._fd)
        self._extent = max(info.st_size, size)  # size to end with
        self._zero = bytes(block_size)
        self._punch = can_punch() and self._regular
        self._sync = sync
        self._closed = False

    def describe(self) -> str:
        return self.path

    def _zero_blocks(self, offset: int, count: int = 1) -> None:
        """``count`` blocks from ``offset`` read as zeroes: a hole where the file system can
        punch one, zeroes written (a MiB at a time) where it cannot."""
        length = min(count * self.block_size, self._size - offset)
        if length <= 0:
            return  # beyond the end of the file: already reads as zeroes
        if self._punch:
            if punch_hole(self._fd, offset, length):
                return
            # Not on this file system (EOPNOTSUPP and friends): write zeroes from now on.
            self._punch = False
        zeroes = bytes(min(length, _ZERO_STEP))
        for at in range(offset, offset + length, _ZERO_STEP):
            os.pwrite(self._fd, zeroes[:min(_ZERO_STEP, offset + length - at)], at)

    def _write_run(self, offset: int, buffers: list[Buffer]) -> None:
        size = len(buffers) * self.block_size
        if len(buffers) == 1:
            written = os.pwrite(self._fd, buffers[0], offset)
        else:
            written = os.pwritev(self._fd, buffers, offset)
        if written != size:  # a short write: finish it the slow way
            data = b"".join(bytes(b) for b in buffers)
            while written < size:
                written += os.pwrite(self._fd, data[written:], offset + written)
        end = offset + size
        if end > self._size:
            self._size = end

    async def apply(self, blocks: Sequence[Block]) -> None:
        if self._closed:
            raise PlayerError(f"{self.path}: already closed")
        try:
            self._apply(blocks)
        except OSError as exc:
            raise PlayerError(f"{self.path}: write failed: {exc.strerror or exc}") from None

    def _apply(self, blocks: Sequence[Block]) -> None:
        """Write ``blocks`` in order: each run of sets on consecutive indexes in one pwritev
        (a restore's blocks mostly come in such runs), a delete as a punched hole.

        A restore passes every block it replays through this loop, so it does no more per
        block than it must: one test for the common case (a full-size set), the rest only
        for the blocks that need it.
        """
        bs = self.block_size
        run: list[Buffer] = []
        run_start = run_next = -1
        for block in blocks:
            index = block.index
            data = block.data
            if block.operation == _SET and len(data) == bs and index >= 0:
                if index == run_next and len(run) < _MAX_IOV:
                    run.append(data)
                    run_next += 1
                    continue
                if run:
                    self._write_run(run_start * bs, run)
                run = [data]
                run_start, run_next = index, index + 1
                continue
            count = self._check(block)
            if block.operation == _SET:  # shorter than a block
                if run and index == run_next and len(run) < _MAX_IOV:
                    run.append(self._padded(data))
                    run_next += 1
                    continue
                if run:
                    self._write_run(run_start * bs, run)
                run = [self._padded(data)]
                run_start, run_next = index, index + 1
            else:
                if run:
                    self._write_run(run_start * bs, run)
                    run = []
                    run_next = -1
                self._zero_blocks(index * bs, count)
                if block.operation == _DELETE:
                    # A delete makes the image as long as a write there would; a range
                    # does not (it may name far more blocks than the vdisk has).
                    self._extent = max(self._extent, (index + 1) * bs)
        if run:
            self._write_run(run_start * bs, run)

    async def read(self, index: int) -> bytes:
        data = os.pread(self._fd, self.block_size, index * self.block_size)
        return data + bytes(self.block_size - len(data))

    async def flush(self) -> None:
        os.fsync(self._fd)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._regular and self._extent > self._size:
                os.ftruncate(self._fd, self._extent)
            if self._sync:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)


# ---------------------------------------------------------------------------------------------
# Redis block store


class RedisBlockStorage(BlockStorage):
    """One Redis key per block: ``<prefix><index>`` (decimal) holds the block's bytes; a
    deleted block has no key. Each `apply` is one pipelined round trip."""

    def __init__(self, address: ServerAddress, prefix: str | bytes,
                 block_size: int = DEFAULT_BLOCK_SIZE, *, timeout: float = 10.0) -> None:
        if block_size < 1:
            raise ValueError(f"block size must be >= 1, got {block_size}")
        self.address = address
        self.prefix = prefix.encode() if isinstance(prefix, str) else bytes(prefix)
        self.block_size = block_size
        # Two quick retries ride out a dropped connection (SET and DEL can be repeated); a
        # server that is down fails the restore at once instead of after redis-py's backoff.
        # Login and TLS as the address says (`ServerAddress.redis_kwargs`).
        self._client = redis.asyncio.Redis(**address.redis_kwargs(), socket_timeout=timeout,
                                           socket_connect_timeout=timeout,
                                           retry=Retry(ConstantBackoff(0.05), 2))
        self._closed = False

    def describe(self) -> str:
        return f"redis {self.address} (keys {self.prefix.decode(errors='replace')}<index>)"

    def key(self, index: int) -> bytes:
        """The key of block ``index``."""
        return block_key(self.prefix, index)

    async def apply(self, blocks: Sequence[Block]) -> None:
        if not blocks:
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            for block in blocks:
                count = self._check(block)
                if block.operation == Operation.SET:
                    pipe.set(self.key(block.index), bytes(self._padded(block.data)))
                elif count <= RANGE_KEYS_MAX:
                    for keys in batches(block_keys(self.prefix, block.index, count)):
                        pipe.delete(*keys)
                else:  # a large range: what the store holds of it, in order
                    await pipe.execute()
                    await self._delete_stored(block.index, count)
                    pipe = self._client.pipeline(transaction=False)
            await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            raise PlayerError(f"block store {self.address}: {exc}") from None

    async def _delete_stored(self, first: int, count: int) -> None:
        """Delete the blocks of ``[first, first + count)`` the store holds (SCAN)."""
        doomed: list[bytes] = []
        async for key in self._client.scan_iter(match=scan_pattern(self.prefix),
                                                count=DELETE_BATCH):
            if in_range(self.prefix, key, first, count):
                doomed.append(key)
                if len(doomed) == DELETE_BATCH:
                    await self._client.delete(*doomed)
                    doomed = []
        if doomed:
            await self._client.delete(*doomed)

    async def read(self, index: int) -> bytes:
        try:
            value = await self._client.get(self.key(index))
        except (redis.RedisError, OSError) as exc:
            raise PlayerError(f"block store {self.address}: {exc}") from None
        if value is None:
            return bytes(self.block_size)
        return value if isinstance(value, bytes) else value.encode()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(redis.RedisError, OSError):
                await self._client.aclose()


# ---------------------------------------------------------------------------------------------
# Player


@dataclass
class PlayResult:
    """What a replay did."""

    aggregations: int = 0
    blocks: int = 0  # applied
    sets: int = 0
    deletes: int = 0
    ranges: int = 0  # range deletes (each one entry of the log)
    duplicates: int = 0  # skipped: sequence replayed before, in the same epoch
    outside: int = 0  # skipped: outside the limits
    data_bytes: int = 0  # bytes of block data applied
    #: Epochs the replay went through (a reset of the sequence numbering starts one), and
    #: the last one's number; the sequences below are those of the last epoch.
    epochs: int = 0
    epoch: int = 0
    first_sequence: int | None = None
    last_sequence: int | None = None  # highest sequence applied
    last_timestamp: int | None = None  # timestamp of the block with the highest sequence
    rebuilt: int = 0  # aggregations read with pieces rebuilt from parity
    seconds: float = 0.0
    #: The checkpoint the replay started from (after a compaction), and its blocks (counted
    #: in ``blocks`` too); its parts do not count as aggregations.
    checkpoint: CheckpointRef | None = None
    checkpoint_blocks: int = 0

    @property
    def mb_per_s(self) -> float:
        """Throughput in MB/s (10^6 bytes) of block data applied."""
        return self.data_bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


class Player:
    """Applies a chain's blocks to a `BlockStorage`.

    ``on_sequence(seq)`` is called for every sequence applied, in order, after its
    aggregation reached the storage (not for a checkpoint's blocks, which are the last
    writes of each index rather than sequences in order); ``on_item(item, result)`` after
    every aggregation (for progress reports).
    """

    def __init__(self, storage: BlockStorage, *,
                 on_sequence: Callable[[int], None] | None = None,
                 on_item: Callable[[ChainItem, PlayResult], None] | None = None) -> None:
        self.storage = storage
        self.on_sequence = on_sequence
        self.on_item = on_item

    async def play(self, reader: ChainReader) -> PlayResult:
        """Replay everything ``reader`` yields; returns the totals."""
        result = PlayResult()
        started = time.perf_counter()
        apply = self.storage.apply
        on_sequence = self.on_sequence
        async for item in reader.items():
            blocks = item.blocks
            await apply(blocks)
            if item.new_epoch or not result.epochs:
                result.epochs += 1
                result.first_sequence = result.last_sequence = result.last_timestamp = None
            result.epoch = item.aggregation.epoch
            if blocks:
                # Whole-list passes (C loops), not a Python loop per block.
                operations = [b.operation for b in blocks]
                deletes = operations.count(_DELETE)
                ranges = operations.count(_DELETE_RANGE)
                result.blocks += len(blocks)
                result.deletes += deletes
                result.ranges += ranges
                result.sets += len(blocks) - deletes - ranges
                result.data_bytes += sum([len(b.data) for b in blocks])
            mark = item.checkpoint
            if mark is not None:
                # The state at the checkpoint: the last write of each index, of several
                # epochs' numberings, so not a sequence range.
                result.checkpoint_blocks += len(blocks)
                if mark.part == mark.parts - 1 and reader.base is not None:
                    result.checkpoint = reader.base
                    result.last_sequence = reader.base.sequence
                    result.last_timestamp = reader.base.timestamp
            else:
                result.aggregations += 1
                result.duplicates += item.duplicates
                result.outside += len(item.aggregation.blocks) - len(blocks) - item.duplicates
                if item.missing or item.corrupt:
                    result.rebuilt += 1
                if blocks:
                    sequences = [b.sequence for b in blocks]
                    low, high = min(sequences), max(sequences)
                    if result.first_sequence is None or low < result.first_sequence:
                        result.first_sequence = low
                    if result.last_sequence is None or high > result.last_sequence:
                        result.last_sequence = high
                        result.last_timestamp = blocks[sequences.index(high)].timestamp
                    if on_sequence is not None:
                        for seq in sequences:
                            on_sequence(seq)
            if self.on_item is not None:
                result.seconds = time.perf_counter() - started
                self.on_item(item, result)
        result.seconds = time.perf_counter() - started
        return result


async def restore(pool: StoragePool, vdisk_id: str, opener: RecordOpener,
                  storage: BlockStorage, *, start_seq: int = 0, end_seq: int = 0,
                  start_ts: int = 0, end_ts: int = 0, epoch: int | None = None,
                  on_sequence: Callable[[int], None] | None = None) -> PlayResult:
    """Replay a vdisk's log into ``storage``: to the last sequence by default, up to
    ``end_seq`` or ``end_ts`` (inclusive) to roll back. 0 means unbounded; sequence bounds
    are of ``epoch`` (None: the current one, see `Limiter`). The storage is not closed."""
    reader = ChainReader(pool, vdisk_id, opener,
                         Limiter(start_seq, end_seq, start_ts, end_ts, epoch))
    return await Player(storage, on_sequence=on_sequence).play(reader)
