"""Vdisk ownership leases in etcd: one tlogserver of a fleet flushes a vdisk at a time.

Each server holds one etcd lease (``--owner-lease-ttl`` seconds, kept alive at a third
of it). At start it registers its ``--server-id`` on it, ``PREFIX/servers/<id>``: a server
whose id is registered by another live server refuses to start (`ServerIdInUse`); a key
left by a previous run that died is taken over (at once when that run was on this host,
else once its lease expired). Before it opens a vdisk it claims ``PREFIX/owners/<vdisk>``
in a transaction that only succeeds when the key does not exist, or already names this
server (then the key is moved onto the current lease, e.g. after a restart). A claim held
by another server refuses the handshake (``NotOwner``, -7, ours): the client tries its next
server, the owner. The key is deleted when the vdisk is released (idle) and the lease is
revoked on shutdown; a server that dies loses its vdisks when its lease expires.

A server that cannot keep its lease alive for a TTL gives up every vdisk it has open
(their clients reconnect and claim again; while etcd is out of reach the claims fail,
`OwnershipUnavailable`, logged once). Even a server that lost its lease without noticing
cannot fork a chain: the head moves by compare-and-set (`tlogserver.flusher`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import aetcd.exceptions
import yaml

from tlog.configsource import OWNERS, SERVERS, ConfigError, EtcdStore, key_path

from .tasks import cancel_and_wait

log = logging.getLogger("tlogserver")

DEFAULT_TTL = 10
#: Seconds between two looks at the lease of another holder of this server's id.
REGISTER_POLL = 0.2
#: Seconds beyond the time left on another holder's lease after which, its key still
#: there, the holder is taken to be alive (it renewed the lease).
EXPIRY_MARGIN = 3.0
#: What etcd may raise while it is out of reach.
_ETCD_ERRORS = (ConfigError, aetcd.exceptions.ClientError, OSError, TimeoutError)


class NotOwner(Exception):
    """Another server holds the vdisk's lease; names it."""


class OwnershipUnavailable(Exception):
    """The vdisk cannot be claimed now: etcd cannot be asked (a transient refusal)."""


class ServerIdInUse(ConfigError):
    """Another live server registered this server's id."""


class Ownership:
    """This server's lease, its id registered on it, and the vdisk keys attached to it."""

    def __init__(self, source: EtcdStore, server_id: str, address: str, ttl: int = DEFAULT_TTL,
                 on_lost: Callable[[str], None] = lambda reason: None) -> None:
        self.source = source
        self.server_id = server_id.encode()
        self.ttl = ttl
        self.on_lost = on_lost
        self.owned: set[str] = set()
        #: Leases given up because they could not be renewed for a TTL (a metric).
        self.leases_lost = 0
        # What this process writes under servers/<id>: compared byte for byte to know its
        # own registration from another's.
        self.registration = yaml.safe_dump({
            "address": address, "host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
        self._lease: Any = None
        self._renewed = 0.0  # time.monotonic() of the last successful keep-alive
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._unavailable: str | None = None  # why claims fail now (logged once)
        self._refused = 0  # claims refused since

    def key(self, vdisk_id: str) -> bytes:
        return key_path(self.source.url.prefix, OWNERS, vdisk_id)

    @property
    def server_key(self) -> bytes:
        return key_path(self.source.url.prefix, SERVERS, self.server_id.decode())

    @property
    def held(self) -> bool:
        """Whether this server holds a lease renewed within its TTL (a metric)."""
        return self._lease is not None and time.monotonic() - self._renewed < self.ttl

    async def start(self) -> None:
        """Take a lease and register this server's id on it (waiting, at most a TTL of the
        other holder, for a previous run's registration to expire), then keep it alive.
        Raises ServerIdInUse, or ConfigError when etcd cannot be reached."""
        async with self._lock:
            self._lease = await self._grant(wait=True)
        self._task = asyncio.get_running_loop().create_task(self._keep_alive(),
                                                            name="ownership lease")

    async def _grant(self, wait: bool) -> Any:
        """A new lease with this server's id registered on it."""
        client = await self.source.client()
        lease = await client.lease(self.ttl)
        try:
            await self._register(client, lease, wait)
        except BaseException:
            try:
                await asyncio.wait_for(client.revoke_lease(lease.id), 5)
            except Exception:
                pass  # it expires by itself
            raise
        self._renewed = time.monotonic()
        return lease

    async def _register(self, client: Any, lease: Any, wait: bool) -> None:
        key = self.server_key
        tx = client.transactions
        name = self.server_id.decode()
        last_ttl: int | None = None
        expires_by: float | None = None  # when the holder's lease runs out unless renewed
        while True:
            ok, responses = await client.transaction(
                compare=[tx.create(key) == 0],
                success=[tx.put(key, self.registration, lease=lease)],
                failure=[tx.get(key)])
            if ok:
                return
            found = responses[0][0] if responses and responses[0] else None
            if found is None:
                continue  # deleted meanwhile: try again
            value, meta = bytes(found[0]), found[1]
            if value == self.registration or _left_by_dead_process(value):
                # Ours (a new lease after a lost one), or a crashed run's on this host.
                ok, _ = await client.transaction(
                    compare=[tx.value(key) == value],
                    success=[tx.put(key, self.registration, lease=lease)], failure=[])
                if ok:
                    if value != self.registration:
                        log.info("server id %s: taking over the registration of a previous "
                                 "run that is gone (%s)", name, _describe(value))
                    return
                continue
            holder = _describe(value)
            if not meta.lease:
                raise ServerIdInUse(f"server id {name} is registered without a lease by "
                                    f"{holder} (written by hand?): delete the key "
                                    f"{key.decode()} with etcdctl if no server uses it")
            info = await client.get_lease_info(meta.lease, keys=False)
            remaining = int(getattr(info, "TTL", -1))  # whole seconds; -1: expired
            now = time.monotonic()
            # A live holder renews its lease: the time left goes up, or outlasts what was
            # left when first seen. A dead one's runs out, and the key goes with it.
            renewed = remaining > 0 and (
                (last_ttl is not None and remaining > last_ttl)
                or (expires_by is not None and now > expires_by))
            if remaining > 0 and (not wait or renewed):
                raise ServerIdInUse(f"server id {name} is in use by a live server ({holder}): "
                                    "give each server its own --server-id")
            if expires_by is None:
                # The time left is in whole seconds, and etcd looks for expired leases
                # every half second: a dead holder's key is gone well within this.
                expires_by = now + max(remaining, 0) + EXPIRY_MARGIN
                if remaining > 0:
                    log.warning("server id %s is registered by %s, %d s left on its lease: "
                                "waiting to see whether it is alive", name, holder, remaining)
            elif now > expires_by + 5:
                raise ServerIdInUse(f"server id {name} is in use ({holder}): its lease did "
                                    "not run out")
            last_ttl = remaining
            await asyncio.sleep(REGISTER_POLL)

    async def _current_lease(self) -> Any:
        async with self._lock:
            if self._lease is None:
                self._lease = await self._grant(wait=False)
            return self._lease

    async def claim(self, vdisk_id: str) -> None:
        """Own ``vdisk_id`` (or already do); raises NotOwner, or OwnershipUnavailable when
        etcd cannot be asked (the handshake then fails as a transient error)."""
        try:
            lease = await self._current_lease()
            client = await self.source.client()
            ok, responses = await self._try_claim(client, lease, vdisk_id)
        except _ETCD_ERRORS as exc:
            self._claims_fail(str(exc) or type(exc).__name__)
            raise OwnershipUnavailable(f"cannot claim the vdisk in etcd: {exc}") from None
        self._claims_work()
        if not ok:
            found = responses[0][0] if responses and responses[0] else None
            owner = bytes(found[0]) if found else b""
            raise NotOwner(f"vdisk {vdisk_id} is owned by {owner.decode(errors='replace')}"
                           " (etcd lease)")
        if vdisk_id not in self.owned:
            self.owned.add(vdisk_id)
            log.info("owner of the vdisk (etcd lease %x)", lease.id, extra={"vdisk": vdisk_id})

    async def _try_claim(self, client: Any, lease: Any, vdisk_id: str) -> tuple[bool, Any]:
        key = self.key(vdisk_id)
        tx = client.transactions
        ok, responses = await client.transaction(
            compare=[tx.create(key) == 0],
            success=[tx.put(key, self.server_id, lease=lease)],
            failure=[tx.get(key)])
        if ok:
            return ok, responses
        found = responses[0][0] if responses and responses[0] else None
        if found is None or bytes(found[0]) != self.server_id:
            return False, responses
        # Ours, maybe on the lease of a previous run: attach it to the current one.
        ok, _ = await client.transaction(
            compare=[tx.value(key) == self.server_id],
            success=[tx.put(key, self.server_id, lease=lease)], failure=[])
        if not ok:
            raise NotOwner(f"vdisk {vdisk_id}: its lease changed hands while claimed")
        return True, []

    def _claims_fail(self, reason: str) -> None:
        """A claim failed for want of etcd: the first is logged, the others counted."""
        self._refused += 1
        if self._unavailable is None:
            self._unavailable = reason
            log.error("cannot claim vdisks while etcd cannot be asked (handshakes of vdisks "
                      "not open here are refused until it answers; logged once): %s", reason)

    def _claims_work(self) -> None:
        if self._unavailable is not None:
            log.info("vdisks can be claimed again (%d handshake(s) refused meanwhile)",
                     self._refused)
            self._unavailable = None
            self._refused = 0

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
        quiet = False  # a failure was logged: the next ones are not, until it works again
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                lease = await self._current_lease()  # a new one after a lost one
                client = await self.source.client()
                reply = await asyncio.wait_for(client.refresh_lease(lease.id), self.ttl / 3)
                if getattr(reply, "TTL", 1) <= 0:  # expired while etcd was out of reach
                    raise aetcd.exceptions.ClientError("the lease expired")
                self._renewed = time.monotonic()
                if quiet:
                    log.info("ownership lease held again (etcd lease %x)", lease.id)
                    quiet = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._lease is not None and time.monotonic() - self._renewed >= self.ttl:
                    self._lose(f"ownership lease not renewed for {self.ttl} s: {exc}")
                elif not quiet:
                    log.warning("ownership lease: keep-alive failed, retrying (logged once "
                                "until it works again): %s", exc)
                quiet = True

    def _lose(self, reason: str) -> None:
        self._lease = None  # a new one, with the id registered again, once etcd answers
        self.leases_lost += 1
        owned, self.owned = sorted(self.owned), set()
        log.error("%s: giving up %d vdisk(s)%s", reason, len(owned),
                  f": {', '.join(owned)}" if owned else "")
        self.on_lost(reason)

    async def close(self) -> None:
        """Revoke the lease: every vdisk key and the server id's registration go with it."""
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


def _holder(value: bytes) -> dict[str, Any]:
    try:
        found = yaml.safe_load(value.decode())
    except (yaml.YAMLError, UnicodeDecodeError):
        return {}
    return found if isinstance(found, dict) else {}


def _describe(value: bytes) -> str:
    holder = _holder(value)
    if not holder:
        return repr(value[:80].decode(errors="replace"))
    return f"{holder.get('address', '?')} on {holder.get('host', '?')}, pid {holder.get('pid')}"


def _left_by_dead_process(value: bytes) -> bool:
    """Whether a registration was written by a process of this host that is gone (or is
    this very process id: a previous run in a container of the same name)."""
    holder = _holder(value)
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False
