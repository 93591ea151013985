"""Starting an export: the device and the vdisk's log brought into agreement before the
first request is answered (docs/nbd.md, "After a crash").

The device's `ExportState` says where it last agreed with the log; the tlogserver's
handshake says where the log is now. A clean stop left them equal: nothing to do. An
unclean one (the NBD side killed, the machine crashed) left the blocks marked in the
intent log possibly different: the **device wins** for them. They are read back and logged
again (deletes for blocks of zeroes), in a new epoch that shuts out whatever the dead run
still had in flight, and the device is synced: from then on a restore of the log at any
FLUSH point equals the device. The device wins because it is what the NBD client last saw,
and because the NBD side holds neither the storage servers' addresses nor the master key
(it cannot read the log); what it gives up is only what NBD lets a disk lose, writes that
were never flushed. A device that cannot be known to hold what the log does (no state,
another epoch, a log behind the device or ahead of a clean one) is not served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from tlog.client import ThreadedClient
from tlog.protocol import Operation

from .backend import Backend
from .intent import ExportState, IntentLog, boot_id

log = logging.getLogger("tlog.nbd")

#: Blocks read back and logged again per step of a recovery.
RELOG_STEP = 256


class ExportRefused(Exception):
    """The device is not known to hold what the log does: it is not served (one line)."""


@dataclass
class Recovery:
    """What a recovery did."""

    ranges: int = 0
    blocks: int = 0  # looked at
    read: int = 0  # of them, read back from the device (the rest holds no data: holes)
    logged: int = 0  # logged again with their data
    deleted: int = 0  # logged again as deletes (zeroes)
    seconds: float = 0.0
    whole_regions: bool = False  # after a crash of the machine: every block of each region

    def line(self, vdisk: str, state: ExportState) -> str:
        grain = ("whole 4 MiB regions: the machine crashed" if self.whole_regions
                 else "the blocks written: the process stopped")
        return (f"vdisk {vdisk}: recovered after an unclean stop ({grain}): looked at "
                f"{self.blocks} block(s) in {self.ranges} range(s) ({self.read} read back), "
                f"logged {self.logged} "
                f"again and {self.deleted} as deletes, in {self.seconds:.2f} s; device and "
                f"log agree at {state.describe()}")


def log_position(client: ThreadedClient) -> tuple[int, int]:
    """(epoch, last sequence; -1 without a log) of the log, as the client connected to it
    knows it: what the handshake said, and what it logged since (all of it flushed)."""
    return client.epoch, client.next_sequence - 1


def verdict(state: ExportState | None, position: tuple[int, int], vdisk: str,
            where: str, *, adopt: bool = False) -> str:
    """``fresh`` (no state, no log), ``clean`` (the device is the log), ``adopt`` (no state,
    taken as the log by the operator's word) or ``recover``, given the log's (epoch, last
    sequence); raises `ExportRefused` for a device that cannot be known to hold what the
    log does."""
    epoch, last = position
    log_at = (f"epoch {epoch}, sequence {last}" if last >= 0
              else f"epoch {epoch}, no write yet")
    if state is None:
        if last < 0:
            return "fresh"
        if adopt:
            return "adopt"
        raise ExportRefused(
            f"{where} has no tlog state, but vdisk {vdisk} has a log ({log_at}): the device "
            "cannot be known to hold what the log does. Restore it from the log first "
            "(tlog restore ... writes the state), or, for a device a tlog nbd of an older "
            "version stopped cleanly, start once with --adopt")
    if state.vdisk != vdisk:
        raise ExportRefused(f"{where} holds vdisk {state.vdisk!r}, not {vdisk!r}")
    ahead = (f"the log has writes the device does not ({log_at}; the device is at "
             f"{state.describe()}): another device took over the vdisk (a failover to its "
             "standby?), or this one was rolled back. Serve the one that is the log, or "
             "restore this one from the log (tlog restore)")
    behind = (f"the log is behind the device ({log_at}; the device is at "
              f"{state.describe()}): the log lost writes, or belongs to something else. "
              "Restore the log's storage, or serve the device under a new vdisk id")
    if state.clean:
        if (epoch, last) == (state.epoch, state.sequence):
            return "clean"
        if (epoch, last) > (state.epoch, state.sequence):
            raise ExportRefused(f"{where}: {ahead}")
        raise ExportRefused(f"{where}: {behind}")
    epochs = (state.epoch, state.epoch + 1) if state.recovering else (state.epoch,)
    if epoch not in epochs:
        raise ExportRefused(f"{where}: {ahead if epoch > state.epoch else behind}")
    if epoch == state.epoch and last < state.sequence:
        raise ExportRefused(f"{where}: {behind}")
    return "recover"


def recover(backend: Backend, intent: IntentLog, client: ThreadedClient, state: ExportState,
            *, timeout: float, new_epoch: Callable[[], int],
            clock: Callable[[], int] = time.time_ns) -> Recovery:
    """Log again what the device holds in every block the intent log marks (in a new epoch,
    ``new_epoch()``, that shuts out what the dead run may still have in flight), wait until
    the log has it, sync the device and clear the marks. No mark: every write the dead run
    logged was stored and synced, nothing is in flight, and no epoch is started (one with
    no block stored would leave no trace in the log)."""
    started = time.monotonic()
    whole = bool(state.boot_id) and state.boot_id != boot_id()
    ranges = intent.dirty(whole_regions=whole)
    done = Recovery(ranges=len(ranges), whole_regions=whole or not intent.block_marks)
    if ranges:
        new_epoch()
    for first, count in ranges:
        # What the device holds no data in (holes of an image) is one range delete; only
        # the rest is read back.
        at = first
        for data_first, data_count in [*backend.allocated(first, count),
                                       (first + count, 0)]:
            if data_first > at:
                client.delete_range(at, data_first - at, clock(), timeout=timeout)
                done.blocks += data_first - at
                done.deleted += data_first - at
            _relog(backend, client, data_first, data_count, done, clock, timeout)
            at = data_first + data_count
    client.wait_flushed(None, timeout=timeout)
    backend.flush()
    intent.clear()
    done.seconds = time.monotonic() - started
    return done


def _relog(backend: Backend, client: ThreadedClient, first: int, count: int, done: Recovery,
           clock: Callable[[], int], timeout: float) -> None:
    """Read blocks ``[first, first + count)`` back and log them again: runs of blocks of
    data as sets, runs of zeroes as range deletes (as a trim is)."""
    bs = backend.block_size
    zero = bytes(bs)
    for start in range(first, first + count, RELOG_STEP):
        n = min(RELOG_STEP, first + count - start)
        view = memoryview(backend.read(start, n))
        blocks = [view[i * bs:(i + 1) * bs] for i in range(n)]
        done.blocks += n
        done.read += n
        i = 0
        while i < n:
            empty = blocks[i] == zero
            j = i + 1
            while j < n and (blocks[j] == zero) == empty:
                j += 1
            if empty:
                client.delete_range(start + i, j - i, clock(), timeout=timeout)
                done.deleted += j - i
            else:
                client.send_many(Operation.SET, start + i, blocks[i:j], clock(),
                                 timeout=timeout)
                done.logged += j - i
            i = j
