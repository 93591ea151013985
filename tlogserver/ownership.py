"""Vdisk ownership leases in etcd: one tlogserver of a fleet flushes a vdisk at a time.

Each server holds one etcd lease (``--owner-lease-ttl`` seconds, kept alive at a third
of it). Before it opens a vdisk it claims ``PREFIX/owners/<vdisk>`` in a transaction that
only succeeds when the key does not exist, or already names this server (``--server-id``;
then the key is moved onto the current lease, e.g. after a restart). A claim held by
another server refuses the handshake (``NotOwner``, -7, ours): the client tries its next
server, the owner. The key is deleted when the vdisk is released (idle) and the lease is
revoked on shutdown; a server that dies loses its vdisks when its lease expires.

A server that cannot keep its lease alive for a TTL gives up every vdisk it has open
(their clients reconnect and claim again). Even a server that lost its lease without
noticing cannot fork a chain: the head moves by compare-and-set (`tlogserver.flusher`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aetcd.exceptions

from tlog.configsource import key_path

from .etcdsource import EtcdSource
from .tasks import cancel_and_wait

log = logging.getLogger("tlogserver")

DEFAULT_TTL = 10


class NotOwner(Exception):
    """Another server holds the vdisk's lease; names it."""


class Ownership:
    """This server's lease and the vdisk keys attached to it."""

    def __init__(self, source: EtcdSource, server_id: str, ttl: int = DEFAULT_TTL,
                 on_lost: Callable[[str], None] = lambda reason: None) -> None:
        self.source = source
        self.server_id = server_id.encode()
        self.ttl = ttl
        self.on_lost = on_lost
        self.owned: set[str] = set()
        self._lease: Any = None
        self._renewed = 0.0  # time.monotonic() of the last successful keep-alive
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def key(self, vdisk_id: str) -> bytes:
        return key_path(self.source.url.prefix, "owners", vdisk_id)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._keep_alive(),
                                                            name="ownership lease")

    async def _current_lease(self) -> Any:
        async with self._lock:
            if self._lease is None:
                client = await self.source.client()
                self._lease = await client.lease(self.ttl)
                self._renewed = time.monotonic()
            return self._lease

    async def claim(self, vdisk_id: str) -> None:
        """Own ``vdisk_id`` (or already do); raises NotOwner, or ConfigError/aetcd errors
        when etcd cannot be asked (the handshake then fails as a transient error)."""
        lease = await self._current_lease()
        client = await self.source.client()
        key = self.key(vdisk_id)
        tx = client.transactions
        ok, responses = await client.transaction(
            compare=[tx.create(key) == 0],
            success=[tx.put(key, self.server_id, lease=lease)],
            failure=[tx.get(key)])
        if not ok:
            found = responses[0][0] if responses and responses[0] else None
            owner = bytes(found[0]) if found else b""
            if owner != self.server_id:
                raise NotOwner(f"vdisk {vdisk_id} is owned by {owner.decode(errors='replace')}"
                               " (etcd lease)")
            # Ours, maybe on the lease of a previous run: attach it to the current one.
            ok, _ = await client.transaction(
                compare=[tx.value(key) == self.server_id],
                success=[tx.put(key, self.server_id, lease=lease)], failure=[])
            if not ok:
                raise NotOwner(f"vdisk {vdisk_id}: its lease changed hands while claimed")
        if vdisk_id not in self.owned:
            self.owned.add(vdisk_id)
            log.info("owner of the vdisk (etcd lease %x)", lease.id, extra={"vdisk": vdisk_id})

    async def release(self, vdisk_id: str) -> None:
        """Give ``vdisk_id`` up (it was released: no client, nothing pending)."""
        self.owned.discard(vdisk_id)
        try:
            client = await self.source.client()
            tx = client.transactions
            key = self.key(vdisk_id)
            await client.transaction(compare=[tx.value(key) == self.server_id],
                                     success=[tx.delete(key)], failure=[])
        except Exception as exc:  # the lease's expiry releases it all the same
            log.warning("could not release the vdisk's lease: %s", exc,
                        extra={"vdisk": vdisk_id})

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                lease = await self._current_lease()
                client = await self.source.client()
                reply = await asyncio.wait_for(client.refresh_lease(lease.id), self.ttl / 3)
                if getattr(reply, "TTL", 1) <= 0:  # expired while etcd was out of reach
                    raise aetcd.exceptions.ClientError("the lease expired")
                self._renewed = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if time.monotonic() - self._renewed >= self.ttl:
                    self._lose(f"ownership lease not renewed for {self.ttl} s: {exc}")
                else:
                    log.warning("ownership lease: keep-alive failed, retrying: %s", exc)

    def _lose(self, reason: str) -> None:
        if self._lease is None and not self.owned:
            return
        self._lease = None  # a new one at the next claim
        owned, self.owned = sorted(self.owned), set()
        log.error("%s: giving up %d vdisk(s): %s", reason, len(owned), ", ".join(owned))
        self.on_lost(reason)

    async def close(self) -> None:
        """Revoke the lease: every vdisk key goes with it."""
        await cancel_and_wait(self._task)
        self._task = None
        lease, self._lease = self._lease, None
        if lease is not None:
            try:
                client = await self.source.client()
                await asyncio.wait_for(client.revoke_lease(lease.id), 5)
            except Exception as exc:
                log.warning("could not revoke the ownership lease (it expires by itself): %s",
                            exc)
