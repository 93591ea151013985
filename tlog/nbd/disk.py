"""A vdisk served over NBD whose every write is logged: the part of the nbdkit plugin that
knows no nbdkit, so it can be tested and reused on its own.

Rules (docs/nbd.md says why):

- Writes are whole blocks in the log. An unaligned request reads the edge blocks, changes
  the bytes asked for and logs and writes the whole blocks (read-modify-write).
- A request's blocks are logged (handed to the client in one go, all or none) before they
  are written to the backend, under one lock, so the log holds the writes in the order the
  image received them and a write the log refused (timeout) never reaches the image.
- Trim and zero of whole blocks log one *range delete* (one entry, one sequence, however
  many blocks; a delete per block with a server that does not take ranges) and deallocate
  the blocks; a restore leaves deleted blocks as holes, so both read back as zeroes. The
  partial blocks at the edges of a zero are written (logged) as zeroes; those of a trim
  are left alone (trim is advisory).
- FLUSH waits until every block logged so far has FlushOK from the tlog server, then syncs
  the backend; FUA does the same for the request's blocks. A wait longer than
  ``flush_timeout``, or a write that cannot be handed to the client within
  ``write_timeout``, is an `OSError` (EIO), never a silent success.
- Crash convergence (`tlog.nbd.intent`, `tlog.nbd.convergence`): every write is marked in
  the export's intent log before it is logged. A FLUSH is also a checkpoint: the writes
  it made safe (in the log, synced on the device) lose their marks; so does a background
  checkpoint every ``checkpoint_blocks`` blocks written. A write the log took but the
  device did not (its backend failed) keeps the marks for good: the next start logs the
  device's blocks again. A clean stop leaves no mark and the state clean.
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
from .failover import promote
from .intent import ExportState, IntentError, IntentLog

log = logging.getLogger("tlog.nbd")
T = TypeVar("T")

#: Seconds a write may wait for room in the client's unflushed buffer, and a FLUSH for FlushOK.
DEFAULT_WRITE_TIMEOUT = 30.0
DEFAULT_FLUSH_TIMEOUT = 30.0
#: Seconds a failover may wait for the log to be flushed and the standby to hold it.
DEFAULT_FAILOVER_TIMEOUT = 60.0
#: Bytes written between two background checkpoints (a FLUSH is one too): what a
#: recovery after a crash of the process looks at is at most about twice this.
DEFAULT_CHECKPOINT_BYTES = 64 * 1024 * 1024


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
                 failover_timeout: float = DEFAULT_FAILOVER_TIMEOUT,
                 intent: IntentLog | None = None, state: ExportState | None = None,
                 checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES) -> None:
        self.backend = backend
        self.size = size
        self.block_size = backend.block_size
        self.client = client
        self.vdisk = vdisk
        self.write_timeout = write_timeout
        self.flush_timeout = flush_timeout
        self._clock = clock
        # Reentrant: a failover taken during a write runs under it too.
        self._write_lock = threading.RLock()
        self._zeros = bytes(self.block_size)
        #: The export's intent log and state (None: nothing recorded, e.g. read-only).
        self.intent = intent
        self.state = state
        self.checkpoint_blocks = max(1, checkpoint_bytes // self.block_size)
        self._since_checkpoint = 0  # blocks marked since the last checkpoint began
        self._checkpoint_lock = threading.Lock()
        self._checkpointer: threading.Thread | None = None
        self._checkpoint_due = threading.Event()
        self._closing = False
        #: A write the log took and the device did not: the marks stay until a restart.
        self.diverged = False
        # counters, for metrics
        self.checkpoints = 0
        #: Syncs of the device by FLUSH, FUA and full checkpoints (not light ones).
        self.device_syncs = 0
        self.written_blocks = 0
        self.failed_requests = 0
        #: FLUSH requests answered (successfully or not) and the seconds they took in all
        self.flushes = 0
        self.flush_seconds = 0.0
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
            self._sync_device()

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
            self._sync_device()

    def flush(self) -> None:
        """Every write so far durable in the log, then the backend synced (a checkpoint)."""
        start = time.monotonic()
        try:
            if self.client is None:
                self._sync_device()
            else:
                self.checkpoint("flush")
        finally:
            self.flushes += 1
            self.flush_seconds += time.monotonic() - start

    def checkpoint(self, what: str = "checkpoint", light: bool = False) -> None:
        """Every write so far stored in the log and synced on the device, then their marks
        cleared and the state's position moved there. When another checkpoint is running,
        only the waits (a FLUSH must not wait for a second one). Raises EIO like FLUSH.

        ``light`` (a background checkpoint): unless the intent log needs the device synced,
        the device is not synced and only the block marks are cleared; the regions stay
        marked (`IntentLog.end_light_checkpoint`)."""
        assert self.client is not None
        if self.intent is None or not self._checkpoint_lock.acquire(blocking=False):
            self._wait_flushed(None, what)
            self._sync_device()
            return
        try:
            with self._write_lock:
                intent = self.intent
                light = light and not intent.needs_device_sync()
                token = intent.begin_checkpoint()
                target = self.client.next_sequence - 1
                self._since_checkpoint = 0
            self._wait_flushed(target, what)
            if not light:
                self._sync_device()
            with self._write_lock:
                if self.diverged or self.intent is not intent:
                    return  # the marks stay (a failed write; or a failover moved them)
                if light:
                    intent.end_light_checkpoint()
                else:
                    intent.end_checkpoint(token)
            state = self.state
            if state is not None:
                state.sequence, state.epoch = target, self.client.epoch
                intent.save(state)
            self.checkpoints += 1
        except (IntentError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno == errno.EIO:
                raise
            raise io_error(f"vdisk {self.vdisk}: {what} failed: {exc}") from None
        finally:
            self._checkpoint_lock.release()

    def _sync_device(self) -> None:
        """The device's writes durable (EIO, or a failover, when the backend fails)."""
        self._on_backend(lambda b: b.flush())
        self.device_syncs += 1

    def _start_checkpointer(self) -> None:
        if self._checkpointer is None:
            self._checkpointer = threading.Thread(target=self._run_checkpoints, daemon=True,
                                                  name=f"tlog checkpoints {self.vdisk}")
            self._checkpointer.start()

    def _run_checkpoints(self) -> None:
        """The background checkpoints (a thread: they wait for FlushOK and sync)."""
        while True:
            self._checkpoint_due.wait()
            self._checkpoint_due.clear()
            if self._closing:
                return
            try:
                self.checkpoint("background checkpoint", light=True)
            except OSError:
                pass  # logged; the marks stay, the next one tries again

    def close(self, quiet: bool = False) -> None:
        """A final flush (errors logged, not raised: nbdkit is going away), then release.
        When the device and the log agree, the state is left clean: the next start needs no
        recovery. ``quiet``: no "stopped" line."""
        try:
            if self.client is not None:
                clean = False
                try:
                    self.checkpoint("final flush")
                    clean = not self.diverged
                except OSError:
                    pass  # already logged
                self._stop_checkpointer()
                if clean and self.intent is not None and self.state is not None:
                    try:
                        self.intent.clear()
                        self.state.clean = True
                        self.intent.save(self.state)
                    except IntentError as exc:
                        log.error("vdisk %s: cannot record the clean stop: %s", self.vdisk, exc)
                stats = self.client.stats()
                if not quiet:
                    log.info("vdisk %s: stopped%s; %d block(s) logged, %d unflushed",
                             self.vdisk, " cleanly, device and log agree at "
                             + self.state.describe() if clean and self.state is not None
                             else "", stats.sent_blocks, stats.unflushed_blocks)
                self.client.close()
        finally:
            self._stop_checkpointer()
            self.backend.close()
            if self.intent is not None:
                self.intent.close()

    def _stop_checkpointer(self) -> None:
        self._closing = True
        thread = self._checkpointer
        if thread is not None:
            self._checkpoint_due.set()
            thread.join(timeout=self.flush_timeout + 10)
            self._checkpointer = None

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
        self._mark(first, len(blocks))
        high = self._log(Operation.SET, first, blocks, "write")
        self._applied(lambda b: b.write(first, data))
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
        if whole_end > whole_first:
            # One entry of the log for the whole blocks, however many (a server without
            # range operations gets a delete per block, handed over in steps).
            n = whole_end - whole_first
            self._mark(whole_first, n)
            high = self._log_range(whole_first, n)
            self._applied(functools.partial(_delete, first=whole_first, count=n))
        return high

    def _log_range(self, first: int, count: int) -> int:
        assert self.client is not None
        try:
            return self.client.delete_range(first, count, self._clock(),
                                            timeout=self.write_timeout)
        except TimeoutError:
            raise io_error(
                f"vdisk {self.vdisk}: delete of blocks {first}..{first + count - 1} refused: "
                f"the tlog client's buffer stayed full for {self.write_timeout:g} s "
                "(tlog servers down or too slow)") from None
        except TlogClientError as exc:
            raise io_error(f"vdisk {self.vdisk}: delete of blocks {first}.."
                           f"{first + count - 1} refused: {exc}") from None

    def _mark(self, first: int, count: int) -> None:
        """Before blocks are logged (write lock held): marked in the intent log; a
        background checkpoint is due every `checkpoint_blocks`."""
        if self.intent is None:
            self.written_blocks += count
            return
        try:
            self.intent.mark(first, count)
        except (IntentError, OSError) as exc:
            # The device's own record cannot be written: the device is failing. Nothing is
            # logged yet: fail over to the standby if there is one, else refuse the write.
            if self._open_standby is None:
                raise io_error(f"vdisk {self.vdisk}: write of blocks {first}.."
                               f"{first + count - 1} refused: cannot mark them in the intent "
                               f"log: {exc}") from None
            self._failover(self.backend, exc)
            assert self.intent is not None
            try:
                self.intent.mark(first, count)
            except (IntentError, OSError) as err:
                raise io_error(f"vdisk {self.vdisk}: write of blocks {first}.."
                               f"{first + count - 1} refused: cannot mark them in the "
                               f"standby's intent log: {err}") from None
        self.written_blocks += count
        self._since_checkpoint += count
        if self._since_checkpoint >= self.checkpoint_blocks:
            self._since_checkpoint = 0
            self._start_checkpointer()
            self._checkpoint_due.set()

    def _applied(self, op: Callable[[Backend], object]) -> None:
        """``op`` on the device, after its blocks were logged: if it fails, the log holds
        what the device does not, and its marks stay until a restart logs the device's
        blocks again (docs/nbd.md, "After a crash")."""
        try:
            self._on_backend(op)
        except OSError:
            if not self.diverged:
                log.error("vdisk %s: the device failed a write the log took: the next start "
                          "logs the device's blocks again", self.vdisk)
            self.diverged = True
            raise

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
        """Switch to the standby once it holds every logged block; the backend to use. No
        write runs meanwhile (the write lock), and the log starts a new epoch with the
        standby: the failed device, whose state names the old one, is never taken for the
        vdisk again (`tlog.nbd.convergence`)."""
        with self._write_lock, self._failover_lock:
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
            try:
                self._move_state(standby)
            except (IntentError, BackendError, TlogClientError, TimeoutError,
                    ValueError) as err:
                with contextlib.suppress(Exception):
                    standby.close()
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

    def _move_state(self, standby: Backend) -> None:
        """At a failover: the standby made the vdisk's device (`tlog.nbd.failover`), the
        export's state and intent log moved onto it."""
        if self.client is None or self.intent is None or self.state is None:
            return
        intent = promote(standby, self.client, self.state, timeout=self.failover_timeout,
                         clock=self._clock)
        with contextlib.suppress(Exception):
            self.intent.close()
        self.intent = intent
        self.diverged = False  # the standby holds the log; the failed writes run again

    def _wait_flushed(self, sequence: int | None, what: str) -> None:
        assert self.client is not None
        try:
            self.client.wait_flushed(sequence, timeout=self.flush_timeout)
        except TimeoutError:
            raise io_error(f"vdisk {self.vdisk}: {what} failed: the tlog servers did not "
                           f"confirm the writes within {self.flush_timeout:g} s") from None
        except TlogClientError as exc:
            raise io_error(f"vdisk {self.vdisk}: {what} failed: {exc}") from None
