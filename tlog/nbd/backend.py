"""Where a served vdisk's blocks live: a local image file, or the Redis block store the
player restores into (``<prefix><index>`` holds a block, a missing key reads as zeroes).

Both are addressed in whole blocks by `tlog.nbd.disk.LoggedDisk`, which does the
read-modify-write of unaligned requests; a backend only reads, writes, deletes and syncs.
"""

from __future__ import annotations

import abc
import errno
import os
import stat
from collections.abc import Callable
from typing import Any, cast

import redis
from redis.backoff import ConstantBackoff
from redis.retry import Retry

from tlog.holes import punch_hole
from tlog.storage import ServerAddress
from tlog.storage.blockstore import (
    DELETE_BATCH,
    RANGE_KEYS_MAX,
    batches,
    block_keys,
    in_range,
    scan_pattern,
)
from tlog.storage.keys import nbd_state_key

from .intent import FileIntentLog, IntentLog, RedisIntentLog


def default_state_path(image: str) -> str:
    """Where the state of an image is kept unless told: beside it."""
    return image + ".tlog-state"


class BackendError(Exception):
    """The backend cannot be opened or used (a message for the operator). File backends
    raise `OSError` as the system gives it."""


class Backend(abc.ABC):
    """Whole blocks of one vdisk."""

    block_size: int
    size: int  # bytes

    @abc.abstractmethod
    def read(self, first: int, count: int) -> bytes:
        """``count`` blocks from block ``first`` (never written or deleted: zeroes)."""

    @abc.abstractmethod
    def write(self, first: int, data: bytes | memoryview) -> None:
        """Consecutive whole blocks from block ``first``, as one buffer (a multiple of the
        block size)."""

    @abc.abstractmethod
    def delete(self, first: int, count: int) -> None:
        """``count`` blocks from ``first`` read as zeroes from now on (the log's delete)."""

    def allocated(self, first: int, count: int) -> list[tuple[int, int]]:
        """The parts of ``[first, first + count)`` that may hold data, as ``(first, count)``;
        the rest reads as zeroes for sure. By default all of it."""
        return [(first, count)]

    @abc.abstractmethod
    def flush(self) -> None:
        """Make what was written durable."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release it."""

    @abc.abstractmethod
    def describe(self) -> str:
        """For log lines."""

    @abc.abstractmethod
    def intent_log(self, state_path: str | None = None) -> IntentLog:
        """The export's state and intent log, kept with these blocks (`tlog.nbd.intent`)."""


class FileBackend(Backend):
    """A raw image file (or block device). ``size`` > 0 creates or extends the file to it;
    0 serves the file at its current size. Deleted blocks are punched out (zeroes written
    where the file system cannot punch), as `tlog restore` leaves them."""

    def __init__(self, path: str, block_size: int, size: int = 0, readonly: bool = False) -> None:
        self.path = path
        self.block_size = block_size
        flags = os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT
        try:
            self._fd = os.open(path, flags, 0o644)
            info = os.fstat(self._fd)
            self._regular = stat.S_ISREG(info.st_mode)
            current = info.st_size if self._regular else os.lseek(self._fd, 0, os.SEEK_END)
            if size and size > current and not readonly and self._regular:
                os.ftruncate(self._fd, size)
                current = size
        except OSError as exc:
            raise BackendError(f"cannot open image {path}: {exc.strerror or exc}") from None
        self.size = current
        self._punch = self._regular
        self._zeros = bytes(block_size)

    def read(self, first: int, count: int) -> bytes:
        offset = first * self.block_size
        want = count * self.block_size
        data = os.pread(self._fd, want, offset)
        while len(data) < want:  # past the end of the file, or a short read
            more = os.pread(self._fd, want - len(data), offset + len(data))
            if not more:
                return data + bytes(want - len(data))
            data += more
        return data

    def write(self, first: int, data: bytes | memoryview) -> None:
        offset = first * self.block_size
        view = memoryview(data)
        while view:
            done = os.pwrite(self._fd, view, offset)
            view = view[done:]
            offset += done

    def delete(self, first: int, count: int) -> None:
        offset, length = first * self.block_size, count * self.block_size
        if self._punch and punch_hole(self._fd, offset, length):
            return
        self._punch = False  # not on this file system: zeroes from now on
        step = max(1, (1 << 20) // self.block_size)  # a MiB of zeroes at a time
        for at in range(first, first + count, step):
            self.write(at, self._zeros * min(step, first + count - at))

    def allocated(self, first: int, count: int) -> list[tuple[int, int]]:
        """The file's data in the range, whole blocks (SEEK_DATA / SEEK_HOLE): a recovery
        after a whole-device trim need not read the holes."""
        bs = self.block_size
        start, end = first * bs, (first + count) * bs
        if not self._regular:
            return [(first, count)]
        out: list[tuple[int, int]] = []
        at = start
        try:
            while at < end:
                try:
                    data = os.lseek(self._fd, at, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        break  # only a hole from here to the end of the file
                    raise
                if data >= end:
                    break
                hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), end)
                lo, hi = max(data // bs, first), min(-(-hole // bs), first + count)
                if out and lo <= out[-1][0] + out[-1][1]:
                    out[-1] = (out[-1][0], hi - out[-1][0])
                else:
                    out.append((lo, hi - lo))
                at = hole
        except OSError:
            return [(first, count)]  # no SEEK_DATA here: look at all of it
        return out

    def flush(self) -> None:
        os.fdatasync(self._fd) if self._regular else os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)

    def describe(self) -> str:
        return f"image {self.path}"

    def intent_log(self, state_path: str | None = None) -> IntentLog:
        """In a file beside the image (``<image>.tlog-state``), or at ``state_path``."""
        path = state_path or default_state_path(self.path)
        return FileIntentLog(path, self.block_size, self.size)


class _StateGuard:
    """On every connection to a block store whose state was recorded, before any command:
    is the state still there? A redis that restarted without persistence lost every block,
    and redis-py would reconnect to it without a word: the device would then read as
    zeroes. The hook is what redis-py runs after each (re)connection, its login
    (``on_connect_check_health`` in redis-py 6 and later, ``on_connect`` before)."""

    guard: Callable[[Any], None]

    def on_connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        super().on_connect_check_health(*args, **kwargs)  # type: ignore[misc]
        self.guard(self)


class _OldStateGuard:
    """`_StateGuard` for redis-py 5, whose connections call ``on_connect``."""

    guard: Callable[[Any], None]

    def on_connect(self) -> None:
        super().on_connect()  # type: ignore[misc]
        self.guard(self)


class RedisBackend(Backend):
    """The Redis block store `tlog restore --output-redis` writes: one key per block,
    ``<prefix><index>`` (decimal), holding the block's bytes; no key for a deleted block.
    Once the export's state is recorded in it, a store that lost it (a restart without
    persistence) is a failed device, not an empty one."""

    def __init__(self, address: ServerAddress, prefix: str, block_size: int, size: int) -> None:
        if size <= 0:
            raise BackendError("a redis backend needs the vdisk's size (--size)")
        self.address = address
        self.prefix = prefix.encode()
        self.block_size = block_size
        self.size = size
        self._state_recorded = False
        # Login and TLS as the address says (`ServerAddress.redis_kwargs`). Two quick
        # retries ride out a dropped connection; a server that is down fails the request at
        # once (redis-py's default backoff took about 4.5 s), so a failover starts at once.
        self._redis = redis.Redis(**address.redis_kwargs(), socket_timeout=30,
                                  socket_connect_timeout=10, health_check_interval=30,
                                  retry=Retry(ConstantBackoff(0.05), 2))
        pool = self._redis.connection_pool
        base = pool.connection_class
        mixin = _StateGuard if hasattr(base, "on_connect_check_health") else _OldStateGuard
        pool.connection_class = type(f"Guarded{base.__name__}", (mixin, base),
                                     {"guard": self._check_state})
        try:
            self._redis.ping()
        except redis.RedisError as exc:
            raise BackendError(f"cannot reach the block store {address}: {exc}") from None

    def _check_state(self, connection: Any) -> None:
        if not self._state_recorded:
            return
        connection.send_command("EXISTS", nbd_state_key(self.prefix))
        if not connection.read_response():
            raise redis.ConnectionError(f"{self.describe()} lost its data: its tlog state is "
                                        "gone (the redis restarted without persistence?)")

    def _keys(self, first: int, count: int) -> list[bytes]:
        return block_keys(self.prefix, first, count)

    def _failed(self, what: str, exc: redis.RedisError) -> BackendError:
        return BackendError(f"{self.describe()}: {what} failed: {exc}")

    def read(self, first: int, count: int) -> bytes:
        size = self.block_size
        out = []
        try:
            values = cast(list[bytes | None], self._redis.mget(self._keys(first, count)))
        except redis.RedisError as exc:
            raise self._failed("read", exc) from None
        for value in values:
            if value is None:
                out.append(bytes(size))
            else:
                out.append(value[:size] + bytes(max(0, size - len(value))))
        return b"".join(out)

    def write(self, first: int, data: bytes | memoryview) -> None:
        size = self.block_size
        blocks = [bytes(data[at:at + size]) for at in range(0, len(data), size)]
        try:
            self._redis.mset(dict(zip(self._keys(first, len(blocks)), blocks, strict=True)))
        except redis.RedisError as exc:
            raise self._failed("write", exc) from None

    def delete(self, first: int, count: int) -> None:
        """Small ranges by naming their keys; a large one (a whole device's trim) by
        looking at the keys the store holds (SCAN): it costs what is stored, not the size."""
        try:
            if count <= RANGE_KEYS_MAX:
                for keys in batches(block_keys(self.prefix, first, count)):
                    self._redis.delete(*keys)
                return
            # (keys deleted during a SCAN do not disturb it)
            doomed: list[bytes] = []
            for key in self._redis.scan_iter(match=scan_pattern(self.prefix),
                                             count=DELETE_BATCH):
                if in_range(self.prefix, key, first, count):
                    doomed.append(key)
                    if len(doomed) == DELETE_BATCH:
                        self._redis.delete(*doomed)
                        doomed = []
            if doomed:
                self._redis.delete(*doomed)
        except redis.RedisError as exc:
            raise self._failed("delete", exc) from None

    def flush(self) -> None:
        """Writes are acknowledged by the server; its persistence decides the rest."""

    def close(self) -> None:
        try:
            self._redis.close()
        except redis.RedisError:
            pass

    def describe(self) -> str:
        return f"redis {self.address} (keys {self.prefix.decode(errors='replace')}<index>)"

    def intent_log(self, state_path: str | None = None) -> IntentLog:
        """In two keys of the block store, beside the blocks (``state_path`` is unused)."""
        return RedisIntentLog(self._redis, self.prefix, self.block_size, self.size,
                              self.describe(), on_save=self._recorded)

    def _recorded(self) -> None:
        self._state_recorded = True
