"""A vdisk served over NBD whose every write is logged: the part of the nbdkit plugin that
knows no nbdkit, so it can be tested and reused on its own.

Rules (docs/nbd.md says why):

- Writes are whole blocks in the log. An unaligned request reads the edge blocks, changes
  the bytes asked for and logs and writes the whole blocks (read-modify-write).
- A request's blocks are logged (handed to the client in one go, all or none) before they
  are written to the backend, under one lock, so the log holds the writes in the order the
  image received them and a write the log refused (timeout) never reaches the image.
- Trim and zero of whole blocks log the *delete* operation and deallocate the blocks; a
  restore leaves deleted blocks as holes, so both read back as zeroes. The partial blocks
  at the edges of a zero are written (logged) as zeroes; those of a trim are left alone
  (trim is advisory).
- FLUSH waits until every block logged so far has FlushOK from the tlog server, then syncs
  the backend; FUA does the same for the request's blocks. A wait longer than
  ``flush_timeout``, or a write that cannot be handed to the client within
  ``write_timeout``, is an `OSError` (EIO), never a silent success.
- Failover: with a standby (the block store tlogserver's slave sync keeps in step), a
  backend that fails is replaced by it, once: every block logged is flushed, the server
  confirms that the standby holds them (WaitNbdSlaveSync), then the request that failed
  runs again on the standby. If any of that fails, the request fails with EIO.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from tlog.client import ThreadedClient, TlogClientError
from tlog.protocol import Operation

from .backend import Backend, BackendError

log = logging.getLogger("tlog.nbd")
T = TypeVar("T")

#: Seconds a write may wait for room in the client's unflushed buffer, and a FLUSH for FlushOK.
DEFAULT_WRITE_TIMEOUT = 30.0
DEFAULT_FLUSH_TIMEOUT = 30.0
#: Seconds a failover may wait for the log to be flushed and the standby to hold it.
DEFAULT_FAILOVER_TIMEOUT = 60.0
#: Blocks deleted (logged, then applied) per step of a trim or zero.
CLEAR_STEP = 8192


def _delete(backend: Backend, first: int, count: int) -> None:
    backend.delete(first, count)


def io_error(message: str) -> OSError:
    """The error an NBD request fails with: EIO, and the reason in the log."""
    log.error("%s", message)
    return OSError(errno.EIO, message)


class LoggedDisk:
    """One vdisk: its backend, and (unless read-only) the tlog client its writes go to."""

    def __init__(self, backend: Backend, size: int, client: ThreadedClient | None, *,
                 vdisk: str, write_timeout: float = DEFAULT_WRITE_TIMEOUT,
                 flush_timeout: float = DEFAULT_FLUSH_TIMEOUT,
                 clock: Callable[[], int] = time.time_ns,
                 standby: Callable[[], Backend] | None = None,
                 failover_timeout: float = DEFAULT_FAILOVER_TIMEOUT) -> None:
        self.backend = backend
        self.size = size
        self.block_size = backend.block_size
        self.client = client
        self.vdisk = vdisk
        self.write_timeout = write_timeout
        self.flush_timeout = flush_timeout
        self._clock = clock
        self._write_lock = threading.Lock()
        self._zeros = bytes(self.block_size)
        #: Opens the standby backend (None: no standby, or switched to it already).
        self._open_standby = standby
        self.failover_timeout = failover_timeout
        self._failover_lock = threading.Lock()

    @property
    def readonly(self) -> bool:
        return self.client is None

    # -- reads --
    def pread(self, offset: int, length: int) -> bytes:
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        data = self._on_backend(lambda b: b.read(first, last - first + 1))
        start = offset - first * bs
        return data[start:start + length]

    # -- writes --
    def pwrite(self, buf: bytes | memoryview, offset: int, fua: bool = False) -> None:
        """Write ``buf`` at ``offset``: logged block by block, then written."""
        self._check_range(offset, len(buf))
        bs = self.block_size
        first, last = offset // bs, (offset + len(buf) - 1) // bs
        with self._write_lock:
            high = self._log_and_write(first, self._merged(first, last, offset, buf))
        if fua:
            self._wait_flushed(high, "FUA write")
            self._on_backend(lambda b: b.flush())

    def zero(self, count: int, offset: int, fua: bool = False) -> None:
        """Zeroes: whole blocks deleted, partial edge blocks written as zeroes."""
        self._clear_range(count, offset, fua, partial_edges=True, what="FUA zero")

    def trim(self, count: int, offset: int, fua: bool = False) -> None:
        """Whole blocks deleted; partial edge blocks keep their content."""
        self._clear_range(count, offset, fua, partial_edges=False, what="FUA trim")

    def _clear_range(self, count: int, offset: int, fua: bool, partial_edges: bool,
                     what: str) -> None:
        self._check_range(offset, count)
        with self._write_lock:
            high = self._clear(count, offset, partial_edges)
        if fua and high is not None:
            self._wait_flushed(high, what)
            self._on_backend(lambda b: b.flush())

    def flush(self) -> None:
        """Every write so far durable in the log, then the backend synced."""
        if self.client is not None:
            self._wait_flushed(None, "flush")
        self._on_backend(lambda b: b.flush())

    def close(self) -> None:
        """A final flush (errors logged, not raised: nbdkit is going away), then release."""
        try:
            if self.client is not None:
                try:
                    self.flush()
                except OSError:
                    pass  # already logged
                stats = self.client.stats()
                log.info("vdisk %s: stopped; %d block(s) logged, %d unflushed", self.vdisk,
                         stats.sent_blocks, stats.unflushed_blocks)
                self.client.close()
        finally:
            self.backend.close()

    # -- the work --
    def _check_range(self, offset: int, length: int) -> None:
        if self.client is None:
            raise OSError(errno.EROFS, "read-only export")
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"request {offset}+{length} outside the disk")

    def _merged(self, first: int, last: int, offset: int, buf: bytes | memoryview
                ) -> bytes | memoryview:
        """The whole blocks ``first..last`` with ``buf`` written into them at ``offset``,
        as one buffer: ``buf`` itself when it is whole blocks. (Nothing keeps it past the
        request: the log's frames are copies, and the backend has written it by then.)"""
        bs = self.block_size
        start = first * bs
        end = (last + 1) * bs
        if offset == start and offset + len(buf) == end:
            return buf
        current = bytearray(self._on_backend(lambda b: b.read(first, last - first + 1)))
        current[offset - start:offset - start + len(buf)] = buf
        return bytes(current)

    def _log_and_write(self, first: int, data: bytes | memoryview) -> int:
        """Log the whole blocks of ``data`` (all or none), then write ``data``; returns the
        last sequence. The blocks are views into ``data`` (the encoder copies each once).
        They are hashed here, under the lock: on two cores, requests hashing in parallel
        cost more in thread switches than they gain (docs/nbd.md)."""
        bs = self.block_size
        view = memoryview(data)
        blocks = [view[at:at + bs] for at in range(0, len(data), bs)]
        high = self._log(Operation.SET, first, blocks, "write")
        self._on_backend(lambda b: b.write(first, data))
        return high

    def _log(self, operation: Operation, first: int, blocks: Sequence[bytes | memoryview],
             what: str) -> int:
        assert self.client is not None
        try:
            return self.client.send_many(operation, first, blocks, self._clock(),
                                         timeout=self.write_timeout)
        except TimeoutError:
            raise io_error(
                f"vdisk {self.vdisk}: {what} of blocks {first}..{first + len(blocks) - 1} "
                f"refused: the tlog client's buffer stayed full for {self.write_timeout:g} s "
                "(tlog servers down or too slow)") from None
        except TlogClientError as exc:
            raise io_error(f"vdisk {self.vdisk}: {what} of blocks {first}.."
                           f"{first + len(blocks) - 1} refused: {exc}") from None

    def _clear(self, count: int, offset: int, partial_edges: bool) -> int | None:
        assert self.client is not None
        bs = self.block_size
        end = offset + count
        whole_first = -(-offset // bs)
        whole_end = end // bs  # exclusive
        high: int | None = None
        if partial_edges:
            for edge_first, lo, hi in self._edges(offset, end, whole_first, whole_end):
                high = self._log_and_write(
                    edge_first, self._merged(edge_first, edge_first, lo, bytes(hi - lo)))
        # In steps, so that a trim of a whole device (mkfs does one) holds a step's frames
        # at a time, and waits for room in the client's buffer between steps.
        for start in range(whole_first, whole_end, CLEAR_STEP):
            n = min(CLEAR_STEP, whole_end - start)
            high = self._log(Operation.DELETE, start, [b""] * n, "delete")
            self._on_backend(functools.partial(_delete, first=start, count=n))
        return high

    def _edges(self, offset: int, end: int, whole_first: int, whole_end: int
               ) -> list[tuple[int, int, int]]:
        """(block, start, end) byte ranges of the partial blocks a range touches."""
        bs = self.block_size
        out = []
        if whole_end < whole_first:  # inside one block
            return [(offset // bs, offset, end)]
        if offset % bs:
            out.append((offset // bs, offset, whole_first * bs))
        if end % bs:
            out.append((end // bs, whole_end * bs, end))
        return out

    # -- the backend, and the failover to the standby --
    def _on_backend(self, op: Callable[[Backend], T]) -> T:
        """``op`` on the backend; when it fails and there is a standby, on the standby."""
        backend = self.backend
        try:
            return op(backend)
        except (BackendError, OSError) as exc:
            if self._open_standby is None and self.backend is backend:
                if isinstance(exc, OSError):
                    raise
                raise io_error(f"vdisk {self.vdisk}: {exc}") from None
            backend = self._failover(backend, exc)
        try:
            return op(backend)
        except BackendError as exc:
            raise io_error(f"vdisk {self.vdisk}: {exc}") from None

    def _failover(self, failed: Backend, exc: Exception) -> Backend:
        """Switch to the standby once it holds every logged block; the backend to use."""
        with self._failover_lock:
            if self.backend is not failed:
                return self.backend  # another request switched already
            open_standby = self._open_standby
            if open_standby is None:
                raise io_error(f"vdisk {self.vdisk}: {exc}")
            log.error("vdisk %s: the backend %s failed (%s): switching to the standby",
                      self.vdisk, failed.describe(), exc)
            if self.client is not None:
                try:
                    self.client.wait_flushed(None, timeout=self.failover_timeout)
                    self.client.wait_nbd_slave_sync(timeout=self.failover_timeout)
                except (TimeoutError, TlogClientError) as err:
                    raise io_error(f"vdisk {self.vdisk}: cannot switch to the standby: the "
                                   f"tlog server could not confirm it holds every write "
                                   f"({err})") from None
            try:
                standby = open_standby()
            except BackendError as err:
                raise io_error(f"vdisk {self.vdisk}: cannot switch to the standby: "
                               f"{err}") from None
            self.backend = standby
            self._open_standby = None
            with contextlib.suppress(Exception):
                failed.close()
            log.warning("vdisk %s: now serving from the standby %s (it holds every logged "
                        "write; slave sync of the vdisk has ended)", self.vdisk,
                        standby.describe())
            return standby

    def _wait_flushed(self, sequence: int | None, what: str) -> None:
        assert self.client is not None
        try:
            self.client.wait_flushed(sequence, timeout=self.flush_timeout)
        except TimeoutError:
            raise io_error(f"vdisk {self.vdisk}: {what} failed: the tlog servers did not "
                           f"confirm the writes within {self.flush_timeout:g} s") from None
        except TlogClientError as exc:
            raise io_error(f"vdisk {self.vdisk}: {what} failed: {exc}") from None
