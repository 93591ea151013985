"""The lease that lets one compaction of a vdisk run at a time.

Two compactions of one vdisk must never overlap: each retires the checkpoints it did not
write, so the second could delete the first one's checkpoint after the first deleted the
aggregations that checkpoint stands for. The lease is a key on every storage server of the
pool (``tlog_compact_lock_<vdisk>``, SET NX with a time to live), renewed while the
compaction runs; it names its holder (host, pid). A holder on this host whose process is
gone (killed) is taken over at once; another host's lapses after the time to live.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid

from tlog.storage import StorageError, StoragePool
from tlog.storage.keys import compaction_lock_key

log = logging.getLogger(__name__)

#: Seconds a lease lives without renewal (renewed every third of it).
LEASE_TTL = 30.0


class CompactionBusy(Exception):
    """Another compaction of the vdisk holds the lease (or this one lost it)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CompactionLock:
    """``async with CompactionLock(pool, vdisk):`` holds the vdisk's compaction lease on every
    server; `check` raises `CompactionBusy` once it is lost (renewal failed)."""

    def __init__(self, pool: StoragePool, vdisk_id: str, *, ttl: float = LEASE_TTL) -> None:
        self.pool = pool
        self.vdisk_id = vdisk_id
        self.ttl = ttl
        self.key = compaction_lock_key(vdisk_id)
        self.host = socket.gethostname()
        self.value = json.dumps({"host": self.host, "pid": os.getpid(),
                                 "token": uuid.uuid4().hex,
                                 "since": time.time_ns()}).encode()
        self._renewer: asyncio.Task[None] | None = None
        self._lost: str | None = None

    async def __aenter__(self) -> CompactionLock:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()

    def _describe(self, held: bytes) -> tuple[str, bool]:
        """Who holds ``held``, and whether it is a dead process of this host."""
        try:
            data = json.loads(held)
            host, pid = str(data["host"]), int(data["pid"])
        except (ValueError, KeyError, TypeError):
            return "an unknown holder", False
        since = data.get("since")
        when = (f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(since / 1e9))} UTC"
                if isinstance(since, int) else "")
        return f"process {pid} on {host}{when}", host == self.host and not _alive(pid)

    async def acquire(self) -> None:
        """Take the lease on every server, or raise `CompactionBusy` naming the holder."""
        for _attempt in range(2):
            try:
                held = await asyncio.gather(*(
                    server.set_if_absent(self.key, self.value, self.ttl)
                    for server in self.pool.servers))
            except StorageError as exc:
                await self._give_back()
                raise CompactionBusy(f"vdisk {self.vdisk_id}: cannot take the compaction "
                                     f"lease: {exc}") from None
            others = {bytes(h) for h in held if h is not None and h != self.value}
            if not others:
                break
            await self._give_back()
            stale = [h for h in others if self._describe(h)[1]]
            if stale and len(stale) == len(others):
                for h in stale:  # killed on this host: its lease is ours to end
                    log.info("vdisk %s: taking over the compaction lease of %s",
                             self.vdisk_id, self._describe(h)[0])
                    await asyncio.gather(*(server.delete_if(self.key, h)
                                           for server in self.pool.servers))
                continue
            who = self._describe(next(iter(others)))[0]
            raise CompactionBusy(f"vdisk {self.vdisk_id}: another compaction is running "
                                 f"({who}); its lease lapses {self.ttl:g} s after it stops")
        else:
            raise CompactionBusy(f"vdisk {self.vdisk_id}: the compaction lease keeps being "
                                 "taken by another process")
        self._renewer = asyncio.create_task(self._renew())

    async def acquire_within(self, wait: float) -> None:
        """`acquire`, tried again every second for up to ``wait`` seconds while another
        compaction holds the lease."""
        deadline = time.monotonic() + wait
        while True:
            try:
                await self.acquire()
                return
            except CompactionBusy:
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(1.0)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                kept = await asyncio.gather(*(server.expire_if(self.key, self.value, self.ttl)
                                              for server in self.pool.servers))
            except StorageError as exc:
                log.warning("vdisk %s: renewing the compaction lease failed: %s",
                            self.vdisk_id, exc)
                continue  # a later renewal may still make it in time
            if not all(kept):
                self._lost = "the compaction lease was lost (it lapsed or was taken over)"
                return

    def check(self) -> None:
        """Raise `CompactionBusy` if the lease was lost: stop before the next change."""
        if self._lost is not None:
            raise CompactionBusy(f"vdisk {self.vdisk_id}: {self._lost}; stopped")

    async def _give_back(self) -> None:
        results = await asyncio.gather(*(server.delete_if(self.key, self.value)
                                         for server in self.pool.servers),
                                       return_exceptions=True)
        for server, result in zip(self.pool.servers, results, strict=True):
            if isinstance(result, Exception):
                log.warning("vdisk %s: the compaction lease on %s is left to lapse: %s",
                            self.vdisk_id, server.address, result)

    async def release(self) -> None:
        """Stop renewing and give the lease back (a server that fails lets it lapse)."""
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.cancel()
            try:
                await renewer
            except asyncio.CancelledError:
                pass
        await self._give_back()
