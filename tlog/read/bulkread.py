"""Opening a chain's records in worker processes, so a restore uses every core.

Checking a record costs far more CPU than reading it: a hash of the whole record (BLAKE3 for
v3, BLAKE2b for v2 and legacy: is it the one the chain names?), AES-GCM, snappy, then BLAKE2b
of every block. Hashing releases the
GIL, but 4 KiB at a time, so threads spend much of their time handing the GIL around (two
threads checking records in memory reach 1.2x one thread on a 2-core machine). Worker
processes have no GIL to share: each fetches the k data pieces of a batch of records
straight from the storage servers (one MGET per server over a blocking socket, logged in and
TLS as the address says: `tlog.storage.resp.RespConnection`), joins, hash-checks, opens and
checks every record exactly as `tlog.read.chain.ChainReader` does, and hands back only the
plaintext aggregation of each record that passed. The parent parses that plaintext into
blocks (cheap next to the checks) and replays them in chain order.

Only the happy path runs here. A record with a missing or corrupt piece, or one that fails
any check, comes back as None and the parent reads it again its own way (parity, every
combination of pieces, the exact error message), so the outcome of a read does not depend
on where its records were opened. A server the workers cannot reach makes the parent stop
using them for the rest of the read.

The workers are forked (Linux), so they inherit the opener and its keys instead of having
them pickled; they touch nothing of the parent's event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import mmap
import multiprocessing
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from tlog.record.aggregation import (
    Aggregation,
    RecordError,
    RecordOpener,
    aggregation_from_plain,
    check_blocks,
)
from tlog.record.erasure import ErasureCoder, ErasureError
from tlog.storage import ServerAddress
from tlog.storage.resp import RespConnection, RespError, pack_command

__all__ = ["Opened", "WorkerPool", "usable_addresses"]

_PR_SET_PDEATHSIG = 1  # prctl(2)

#: What a worker hands back for one record: where its plaintext aggregation is (an
#: (offset, length) in the shared buffer, or the bytes themselves when the batch's slot is
#: full), record size, compressed size, key id and format; None when the parent must read
#: the record itself.
Opened = tuple[tuple[int, int] | bytes, int, int, int | None, str] | None

#: Bytes of shared memory per batch in flight: the plaintexts of 32 aggregations of 25
#: blocks of 4 KiB take 3.4 MB; what does not fit travels through the result pipe instead.
SLOT_BYTES = 8 * 1024 * 1024


def usable_addresses(servers: Sequence[object], k: int) -> list[ServerAddress] | None:
    """The addresses of the k data servers when workers can reach them (Redis servers, with
    their credentials and TLS); None otherwise (in-memory storage: threads then)."""
    addresses = []
    for server in servers[:k]:
        address = getattr(server, "server_address", None)
        if not isinstance(address, ServerAddress):
            return None
        addresses.append(address)
    return addresses


@dataclass
class _Worker:
    """What one worker process keeps between batches."""

    addresses: list[ServerAddress]
    coder: ErasureCoder
    opener: RecordOpener
    vdisk_id: str
    timeout: float
    shared: mmap.mmap
    block_hashes: bool = True  # check the blocks' hashes of v2 and v3 records too
    conns: dict[int, RespConnection] = field(default_factory=dict)

    def conn(self, index: int) -> RespConnection:
        found = self.conns.get(index)
        if found is None:
            found = self.conns[index] = RespConnection(self.addresses[index], self.timeout)
        return found

    def drop(self, index: int) -> None:
        conn = self.conns.pop(index, None)
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass


_worker: _Worker | None = None


def _end_with_parent(parent: int) -> None:
    """Have the kernel kill this worker when its parent dies (even by kill -9, which leaves
    no chance to stop the pool: the workers would wait on their queue for ever)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: the pool's own shutdown is all there is
    if os.getppid() != parent:  # the parent died before the request was made
        os._exit(1)


def _init(addresses: list[ServerAddress], k: int, m: int, opener: RecordOpener,
          vdisk_id: str, timeout: float, shared: mmap.mmap, parent: int,
          block_hashes: bool) -> None:
    global _worker
    # Ctrl-C reaches the whole process group: the parent stops the read, workers just end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _end_with_parent(parent)
    # Joining data pieces needs no encoder: skip setting up pyeclib in every worker.
    _worker = _Worker(addresses, ErasureCoder(k, m, use_pyeclib=False), opener, vdisk_id,
                      timeout, shared, block_hashes)


def _ready() -> bool:
    return _worker is not None


def _open_one(w: _Worker, key: bytes, prev: bytes, data: list[bytes | None],
              slot: list[int]) -> Opened:
    """Check and open one record; its plaintext goes to ``slot`` ([next free offset, end])
    of the shared buffer when it fits."""
    if any(piece is None for piece in data):
        return None
    coder = w.coder
    try:
        record = coder.decode([*data, *([None] * coder.m)])
    except ErasureError:
        return None
    if not w.opener.key_matches(record, key):
        return None
    try:
        agg = w.opener.open(record, key, True)
    except RecordError:
        return None
    if agg.prev != prev or agg.vdisk_id != w.vdisk_id or agg.plain is None:
        return None
    if (w.block_hashes or agg.format == "legacy") and check_blocks(agg):
        return None
    plain = agg.plain
    at, end = slot
    size = len(plain)
    where: tuple[int, int] | bytes
    if at + size <= end:
        w.shared[at:at + size] = plain
        where = (at, size)
        slot[0] = at + size
    else:
        where = bytes(plain)
    return (where, agg.record_size, agg.compressed_size, agg.key_id, agg.format)


def open_batch(links: list[tuple[bytes, bytes]],
               slot: int | None) -> tuple[list[Opened], str | None]:
    """In a worker: fetch, check and open the records of ``links`` ((key, prev) pairs),
    writing their plaintexts into shared slot ``slot`` (None: none free, use the pipe).

    Returns one `Opened` per link, and the error of a server that could not be read (then
    every result is None).
    """
    w = _worker
    if w is None:
        raise RuntimeError("bulkread worker not initialized")
    keys = [key for key, _ in links]
    columns: list[list[bytes | None]] = []
    index = 0
    try:
        # All requests first, then the replies: the servers work at the same time.
        request = pack_command("MGET", *keys)
        for index in range(w.coder.k):
            w.conn(index).sock.sendall(request)
        for index in range(w.coder.k):
            columns.append(w.conn(index).mget_reply(len(keys)))
    except (OSError, RespError, ValueError) as exc:
        for i in range(w.coder.k):
            w.drop(i)  # a connection may be left with an unread reply
        return [None] * len(links), f"storage server {w.addresses[index]}: {exc}"
    space = [slot * SLOT_BYTES, (slot + 1) * SLOT_BYTES] if slot is not None else [0, 0]
    return [_open_one(w, key, prev, [column[j] for column in columns], space)
            for j, (key, prev) in enumerate(links)], None


class WorkerPool:
    """Forked worker processes that run `open_batch`, and the shared buffer their
    plaintexts come back in: one slot per batch in flight, copied out by the parent as
    soon as the batch is done (the blocks handed to the caller must not change after)."""

    def __init__(self, workers: int, addresses: list[ServerAddress], k: int, m: int,
                 opener: RecordOpener, vdisk_id: str, timeout: float, slots: int,
                 block_hashes: bool = True) -> None:
        self._shared = mmap.mmap(-1, slots * SLOT_BYTES)  # anonymous, shared with forks
        self._free = list(range(slots))
        self._executor = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("fork"), initializer=_init,
            initargs=(addresses, k, m, opener, vdisk_id, timeout, self._shared, os.getpid(),
                      block_hashes))
        # Fork now (the first call starts every worker), while this process has no thread
        # of ours that a fork could catch holding a lock. Python 3.12+ warns about forking
        # a process with threads at all (the event loop's resolver pool may have some); the
        # workers touch none of the parent's locks: sockets, hashing, AES, snappy only.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self._executor.submit(_ready)

    @staticmethod
    def available() -> bool:
        """Whether worker processes can be forked here (Linux)."""
        return sys.platform.startswith("linux")

    async def open(self, links: list[tuple[bytes, bytes]],
                   ) -> tuple[list[Aggregation | None], str | None]:
        """Have a worker fetch, check and open ``links`` ((key, prev) pairs): the
        aggregations (None for a record this process must read itself), and the error of a
        storage server the workers could not read."""
        slot = self._free.pop() if self._free else None
        try:
            opened, error = await asyncio.wrap_future(
                self._executor.submit(open_batch, links, slot))
            return [None if o is None else self._rebuild(key, o)
                    for (key, _), o in zip(links, opened, strict=True)], error
        finally:
            if slot is not None:
                self._free.append(slot)

    def _rebuild(self, key: bytes, opened: tuple[tuple[int, int] | bytes, int, int,
                                                 int | None, str]) -> Aggregation:
        """The aggregation of a record a worker opened (parsed here from a copy of its
        plaintext; the worker checked everything)."""
        where, record_size, compressed_size, key_id, fmt = opened
        if isinstance(where, bytes):
            plain = where
        else:
            at, size = where
            plain = self._shared[at:at + size]  # a copy: the slot is reused
        return aggregation_from_plain(plain, key, record_size, compressed_size, key_id, fmt)

    def close(self) -> None:
        """Stop the workers (batches not started are dropped)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
