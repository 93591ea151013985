"""The server: owns the listeners, the vdisks and the storage pools.

`TlogServer` accepts connections (`tlogserver.connection.TlogConnection`), opens each vdisk
on its first handshake (`tlogserver.vdisk`, which orders and buffers blocks, and its
`tlogserver.flusher`, which stores them), drains on SIGTERM/SIGINT (stop accepting, flush
every vdisk, answer, close, exit), reloads its config file on SIGHUP, and serves metrics
and health checks when asked to (`tlogserver.http`, `tlogserver.metrics`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from tlog import compiled
from tlog.read.head import find_last_and_heads
from tlog.read.resends import stored_writes
from tlog.record.aggregation import Keyring, LegacyWriter, RecordOpener, V2Writer
from tlog.record.crypto import LegacyCipher
from tlog.record.identity import StoredWrites
from tlog.record.keying import V2_VERSION, V3_VERSION
from tlog.record.pieces import DecodeError
from tlog.storage import (
    ClusterPoolFactory,
    StorageConfig,
    StorageConfigError,
    StorageError,
    StoragePool,
    StoragePoolFactory,
    StorageServer,
    any_pool_factory,
)
from tlog.units import parse_duration

from . import logs
from .budget import ServerBudget
from .config import (
    RELOADABLE,
    ConfigError,
    ServerConfig,
    changed_options,
    describe_change,
    server_tls_context,
)
from .connection import TlogConnection
from .etcdsource import EtcdSource
from .fleet import fleet_gauges, fleet_unready
from .flusher import Flusher, StoredObserver
from .http import OpsServer
from .looplag import LoopLagProbe
from .metrics import ServerCollector, make_registry
from .ownership import Ownership
from .retention import SURVEY_SECONDS, RetentionKeeper, standby_holds
from .slavesync import SlaveSyncer, start_syncers, stop_syncers
from .stats import ServerStats
from .tasks import BackgroundTasks
from .vdisk import StoredWritesReader, Vdisk

log = logging.getLogger("tlogserver")
#: /readyz pings every storage server at most this often, each with this timeout.
READY_CACHE_SECONDS = 1.0
PING_TIMEOUT = 2.0
#: Seconds a shutdown waits for the standbys to apply what was stored.
SLAVE_STOP_WAIT = 5.0
#: Seconds a shutdown waits for the background tasks still running (handshakes, flusher
#: stops, lease releases) before it cancels them.
TASKS_STOP_WAIT = 5.0


class TlogServer:
    """Listener, vdisks and storage of one tlogserver process."""

    def __init__(self, config: ServerConfig, factory: StoragePoolFactory | None = None) -> None:
        self.config = config
        self.factory = factory or _pool_factory(config)
        self.vdisks: dict[str, Vdisk] = {}
        #: Slave sync of each vdisk with a standby (--with-slave-sync); they outlive the
        #: vdisks' open/release cycles.
        self.syncers: dict[str, SlaveSyncer] = {}
        #: Where the config comes from when it is etcd (watched), for /readyz.
        self.config_source: EtcdSource | None = None
        #: Vdisk ownership leases (with an etcd config).
        self.ownership: Ownership | None = None
        self._opening: dict[str, asyncio.Future[Vdisk]] = {}
        self.connections: set[TlogConnection] = set()
        self._server: asyncio.base_events.Server | None = None
        self._plain_server: asyncio.base_events.Server | None = None
        self._stopping = asyncio.Event()
        self.stats = ServerStats()
        self.opener = _opener(config)
        assert config.master_key is not None
        #: Log sizes and retention policies of the vdisks served (docs/retention.md).
        self.keeper = RetentionKeeper(
            self.stats, self.opener, config.master_key, record_version(config),
            lambda: [i for i, v in self.vdisks.items() if not v.retired],
            self.factory.pool_for, lambda vdisk_id: self.config.retention_for(vdisk_id),
            lambda vdisk_id: standby_holds(self.syncers.get(vdisk_id)),
            lambda: min(SURVEY_SECONDS, parse_duration(self.config.retention_interval)))
        self.registry = make_registry(ServerCollector(
            self.stats, lambda: len(self.connections), lambda: self.budget.used,
            lambda: self.vdisks, lambda: self.syncers, self.keeper.gauges,
            lambda: fleet_gauges(self.config_source, self.ownership)))
        #: How late the event loop runs (``tlog_event_loop_lag_seconds``).
        self.lag_probe = LoopLagProbe(self.stats.loop_lag)
        self._ops: OpsServer | None = None
        self._probe: asyncio.Task[tuple[bool, str]] | None = None
        self._probed: tuple[float, bool, str] | None = None  # (loop time, ready, reason)
        self.access = config.access_policy
        self.tls: ssl.SSLContext | None = server_tls_context(config) if config.tls else None
        #: What all vdisks hold together (--max-server-buffered-bytes).
        self.budget = ServerBudget(config.max_server_buffered_bytes)
        self._refused_logged = 0.0  # loop time of the last "connection refused" log line
        self._refused_quiet = 0  # refusals since then, not logged one by one
        #: Handshakes, flusher stops, lease releases: awaited by `shutdown`.
        self.tasks = BackgroundTasks(log)

    @property
    def sockets(self) -> list[Any]:
        """The main listener's sockets (TLS when ``tls_cert`` is set)."""
        return list(self._server.sockets) if self._server else []

    @property
    def plain_sockets(self) -> list[Any]:
        """The sockets of the extra plain-TCP listener (``plain_address``), if any."""
        return list(self._plain_server.sockets) if self._plain_server else []

    @property
    def metrics_sockets(self) -> list[Any]:
        """The sockets of the /metrics, /healthz, /readyz endpoint (none when it is off)."""
        return self._ops.sockets if self._ops else []

    async def start(self) -> None:
        """Log the setup, open the ops endpoint (if configured), then listen for clients."""
        cfg = self.config
        if self.factory.is_memory:
            log.warning("storage: in-memory (embedded default): data will NOT survive a restart")
        else:
            log.info("storage: %s", self.factory.describe())
        log.info("%s", compiled.summary())  # compiled, or pure Python and why
        if cfg.ephemeral_key:
            log.warning("no master key given: using a random key for this run only")
        if cfg.storage_format == "legacy":
            log.warning("storage format legacy: every aggregation is encrypted with the SAME "
                        "AES-GCM nonce (0-Disk's layout); use it only for compatibility")
        else:
            log.info("master key id %s writes; %s", _key_ids(self.opener.keyring.ids[:1]),
                     f"also reading key ids {_key_ids(self.opener.keyring.ids[1:])}"
                     if len(self.opener.keyring.ids) > 1 else "no old keys")
        self._log_access()
        pieces = cfg.min_pieces if cfg.min_pieces is not None else min(cfg.k + 1, cfg.k + cfg.m)
        if 2 * pieces <= cfg.k + cfg.m:
            log.warning("min-pieces %d of k+m=%d: two servers writing the same vdisk could "
                        "both get a round stored (the head's compare-and-set needs "
                        "2 * min-pieces > k + m to keep them apart)", pieces, cfg.k + cfg.m)
        self.syncers.update(start_syncers(cfg, self.factory, self.opener))
        if cfg.storage_format != "legacy":  # legacy logs are neither measured nor compacted
            self.keeper.start()
        self.lag_probe.start()
        if cfg.metrics_host is not None:
            # First, so that it is up once "listening on" is logged.
            self._ops = OpsServer(cfg.metrics_host, cfg.metrics_port, self.registry,
                                  self.readiness)
            await self._ops.start()
            for sock in self._ops.sockets:
                host, port = sock.getsockname()[:2]
                log.info("metrics on http://%s:%d/metrics (health: /healthz, /readyz)", host,
                         port)
        loop = asyncio.get_running_loop()
        try:
            if self.tls is not None:
                self._server = await loop.create_server(
                    lambda: TlogConnection(self, tls=True), cfg.host, cfg.port,
                    reuse_address=True, backlog=1024, ssl=self.tls,
                    ssl_handshake_timeout=cfg.handshake_timeout)
                if cfg.plain_host is not None:
                    self._plain_server = await loop.create_server(
                        lambda: TlogConnection(self), cfg.plain_host, cfg.plain_port,
                        reuse_address=True, backlog=1024)
            else:
                self._server = await loop.create_server(
                    lambda: TlogConnection(self), cfg.host, cfg.port, reuse_address=True,
                    backlog=1024)
        except BaseException:
            for listener in (self._server, self._plain_server):
                if listener is not None:
                    listener.close()
            if self._ops is not None:
                await self._ops.close()
            raise
        if self._plain_server is not None:
            for sock in self._plain_server.sockets:
                host, port = sock.getsockname()[:2]
                log.info("also listening on %s:%d: plain TCP, for clients without TLS", host,
                         port)
        for sock in self._server.sockets:
            host, port = sock.getsockname()[:2]
            log.info("listening on %s:%d (%s, flush-size %d, flush-time %gs, k=%d, m=%d, "
                     "format %s)", host, port,
                     ("TLS, client certificates checked" if cfg.tls_client_ca else "TLS")
                     if self.tls is not None else "plain TCP",
                     cfg.flush_size, cfg.flush_time, cfg.k, cfg.m, cfg.storage_format)

    def ownership_lost(self, reason: str) -> None:
        """The etcd lease could not be kept: close every open vdisk (clients reconnect,
        and the handshake claims the vdisk again, here or at its new owner)."""
        for vdisk in list(self.vdisks.values()):
            vdisk.abandon(reason)

    def keeps_standby(self, vdisk_id: str) -> bool:
        """Whether slave sync keeps a standby of ``vdisk_id`` in step (a WaitNbdSlaveSync can
        succeed): told to the client in the handshake (``slaveSync``)."""
        syncer = self.syncers.get(vdisk_id)
        return syncer is not None and not syncer.ended

    def slave_sync_unavailable(self, vdisk: Vdisk) -> str | None:
        """Why a WaitNbdSlaveSync for ``vdisk`` fails at once (None: it is waited for)."""
        if vdisk.id in self.syncers:
            return None
        if not self.config.with_slave_sync:
            return "slave sync is off (tlogserver --with-slave-sync)"
        return "the vdisk has no standby (slave_sync and slave_server in its config entry)"

    async def wait_slave_sync(self, vdisk: Vdisk) -> str | None:
        """WaitNbdSlaveSync: flush what the vdisk holds, wait until its standby holds every
        stored aggregation (as the standby's own position key says, read back at that
        moment: a standby that lost its data is rebuilt first), then end its slave sync.
        None on success, else why not."""
        syncer = self.syncers.get(vdisk.id)
        if syncer is None:
            return self.slave_sync_unavailable(vdisk)
        if syncer.ended:
            return None  # ended before: the standby is the primary already
        timeout = self.config.slave_sync_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        vdisk.flush_all()
        try:
            await asyncio.wait_for(vdisk.flusher.wait_idle(), timeout)
        except TimeoutError:
            return f"the blocks received were not stored within {timeout:g} s"
        target = vdisk.flusher.stored_head
        while True:
            if not await syncer.wait_applied(target, max(0.0, deadline - loop.time())):
                why = f": {syncer.error}" if syncer.error else ""
                return f"the standby was not in step within {timeout:g} s{why}"
            try:
                async with asyncio.timeout(max(0.001, deadline - loop.time())):
                    if await syncer.holds(target):
                        break
            except (TimeoutError, StorageError) as exc:
                return f"the standby cannot be read: {exc or 'no answer'}"
            # It lost what it held (rebuilt now), or another writer moved it: wait again.
        return await syncer.end("WaitNbdSlaveSync")

    def _log_access(self) -> None:
        """Say how vdisks are guarded, and warn about what is open."""
        policy = self.access
        cfg = self.config
        log.info("access: default %s; %d vdisk(s) with their own rule; %d client "
                 "certificate name(s) mapped", "/".join(sorted(policy.default.modes)),
                 len(policy.vdisks), len(policy.tls_clients))
        if "plain" in policy.default.modes:
            log.warning("access: vdisks without a rule of their own accept any client that "
                        "reaches the port (access: plain); use token or mtls in production")
        if "token" in policy.modes_used and (self.tls is None or cfg.plain_host is not None):
            log.warning("access: tokens are accepted on a plain TCP listener, where anyone "
                        "on the path can read them; prefer TLS")

    def note_refused(self, name: str) -> None:
        """Log a connection refused at accept (over --max-connections): at most once a
        second, with the count of those not logged."""
        now = time.monotonic()
        if now - self._refused_logged < 1.0:
            self._refused_quiet += 1
            return
        quiet = self._refused_quiet
        extra = f" ({quiet} more since the last report)" if quiet else ""
        log.warning("connection %s refused: %d connections open (max-connections)%s", name,
                    len(self.connections), extra)
        self._refused_logged = now
        self._refused_quiet = 0

    def stored_writes_reader(self, vdisk_id: str
                             ) -> StoredWritesReader:
        """What `Vdisk.load_writes` reads stored blocks with, for ``vdisk_id``."""
        pool = self.factory.pool_for(vdisk_id)

        def read(head: bytes, from_sequence: int, epoch: int,
                 limit: int) -> Awaitable[StoredWrites]:
            return stored_writes(pool, vdisk_id, head, self.opener,
                                 from_sequence=from_sequence, epoch=epoch, limit=limit)
        return read

    async def vdisk(self, vdisk_id: str) -> Vdisk:
        """The vdisk, created on first use with its chain continued from storage."""
        found = self.vdisks.get(vdisk_id)
        if found is not None and not found.retired:
            return found
        opening = self._opening.get(vdisk_id)
        if opening is not None:
            return await asyncio.shield(opening)
        future: asyncio.Future[Vdisk] = asyncio.get_running_loop().create_future()
        self._opening[vdisk_id] = future
        try:
            vdisk = await self._open(vdisk_id)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters get it through await
            raise
        else:
            future.set_result(vdisk)
            self.vdisks[vdisk_id] = vdisk
            return vdisk
        finally:
            del self._opening[vdisk_id]

    async def _open(self, vdisk_id: str) -> Vdisk:
        pool = self.factory.pool_for(vdisk_id)
        if self.ownership is None:
            return await self._open_owned(vdisk_id, pool)
        await self.ownership.claim(vdisk_id)  # NotOwner: another server has it
        try:
            return await self._open_owned(vdisk_id, pool)
        except BaseException:
            await self.ownership.release(vdisk_id)
            raise

    async def _open_owned(self, vdisk_id: str, pool: StoragePool) -> Vdisk:
        cfg = self.config
        try:
            last, server_heads = await find_last_and_heads(pool, vdisk_id, self.opener)
        except DecodeError as exc:
            raise RuntimeError(f"cannot continue the chain: {exc}") from None
        prev = last.hash if last is not None else bytes(32)
        if last is not None:
            log.info("continuing the chain after %s (epoch %d, last sequence %d)",
                     last.hash.hex()[:16], last.epoch, last.last_sequence,
                     extra={"vdisk": vdisk_id})
        assert cfg.master_key is not None
        writer: V2Writer | LegacyWriter
        if cfg.storage_format == "legacy":
            assert cfg.legacy_nonce is not None
            writer = LegacyWriter(cfg.master_key, cfg.legacy_nonce, vdisk_id)
        else:
            writer = V2Writer(cfg.master_key, vdisk_id, record_version(cfg))
        # Told of every stored round, before the vdisk: its standby, the log's measure.
        observers: list[StoredObserver] = []
        syncer = self.syncers.get(vdisk_id)
        if syncer is not None:
            syncer.attach(prev, last.epoch if last is not None else 0,
                          last.last_sequence if last is not None else -1)
            observers.append(syncer.stored)
        observers.append(partial(self.keeper.stored, vdisk_id,
                                 factor=(pool.k + pool.m) / pool.k))
        flusher = partial(Flusher, vdisk_id, pool, writer, prev, stats=self.stats,
                          observers=observers, min_pieces=cfg.min_pieces,
                          server_heads=server_heads)
        vdisk = Vdisk(vdisk_id, cfg, flusher, self._retire, self.stats,
                      epoch=last.epoch if last is not None else 0,
                      last_sequence=last.last_sequence if last is not None else None,
                      has_chain=last is not None, server_budget=self.budget,
                      takes_ranges=cfg.storage_format != "legacy")
        vdisk.flusher.start()
        self.keeper.opened(vdisk_id)
        return vdisk

    def _retire(self, vdisk: Vdisk) -> None:
        if self.vdisks.get(vdisk.id) is vdisk:
            del self.vdisks[vdisk.id]
        self.tasks.start(vdisk.flusher.stop(), f"stopping the flusher of {vdisk.id}")
        if self.ownership is not None and not self._stopping.is_set():
            self.tasks.start(self.ownership.release(vdisk.id),
                             f"releasing the ownership of {vdisk.id}")
        log.debug("idle, released", extra={"vdisk": vdisk.id})

    async def serve_forever(self) -> None:
        await self._stopping.wait()

    def request_stop(self) -> None:
        self._stopping.set()

    async def shutdown(self) -> bool:
        """Stop accepting, flush every vdisk, close connections. True if all was stored."""
        self._stopping.set()  # /readyz says so from now on
        for listener in (self._server, self._plain_server):
            if listener is not None:
                listener.close()
        for conn in list(self.connections):
            conn.pause("drain")
        vdisks = list(self.vdisks.values())
        clean = True
        if vdisks:
            log.info("draining %d vdisk(s)", len(vdisks))
            try:
                await asyncio.wait_for(asyncio.gather(*(v.drain() for v in vdisks)),
                                       self.config.drain_timeout)
            except TimeoutError:
                clean = False
                log.error("drain timed out after %gs: some blocks were not stored (clients "
                          "still hold them and resend)", self.config.drain_timeout)
        for conn in list(self.connections):
            conn.close("server shutting down")
        for vdisk in vdisks:
            await vdisk.flusher.stop()
        await self.tasks.close(TASKS_STOP_WAIT)
        await stop_syncers(list(self.syncers.values()), SLAVE_STOP_WAIT)
        await self.keeper.stop()
        await self.lag_probe.stop()
        if self.ownership is not None:
            await self.ownership.close()
        for listener in (self._server, self._plain_server):
            if listener is not None:
                await listener.wait_closed()
        if self._probe is not None:
            self._probe.cancel()
        if self._ops is not None:
            await self._ops.close()
        await self.factory.close()
        return clean

    # -- health --
    async def readiness(self) -> tuple[bool, str]:
        """``/readyz``: listening, not shutting down, and every storage server answers.

        Storage is pinged at most once per `READY_CACHE_SECONDS`, whatever the number of
        probes; concurrent probes share one round of pings.
        """
        if self._stopping.is_set():
            return False, "shutting down"
        unready = fleet_unready(self.config_source, self.ownership)
        if unready is not None:
            return False, unready
        if self._server is None or not self._server.is_serving():
            return False, "not listening yet"
        loop = asyncio.get_running_loop()
        if self._probed is not None and loop.time() - self._probed[0] < READY_CACHE_SECONDS:
            return self._probed[1], self._probed[2]
        if self._probe is None or self._probe.done():
            self._probe = loop.create_task(self._probe_storage())
        return await asyncio.shield(self._probe)

    async def _probe_storage(self) -> tuple[bool, str]:
        servers = self.factory.servers()
        failures = [f for f in await asyncio.gather(*(_ping(s) for s in servers)) if f]
        ready = not failures
        reason = "ready" if ready else "storage unreachable: " + "; ".join(failures)
        if self._probed is not None and self._probed[1] != ready:
            if ready:
                log.info("ready again: every storage server answers")
            else:
                log.warning("not ready: %s", reason)
        self._probed = (asyncio.get_running_loop().time(), ready, reason)
        return ready, reason

    # -- config reload --
    def reload_from(self, load: Callable[[], ServerConfig]) -> bool:
        """SIGHUP: build the config again with ``load`` and apply it; on any error keep the
        running one. True if the new config was applied."""
        try:
            new = load()
        except Exception as exc:  # a ConfigError names the bad key; anything else is logged too
            return self.reload_failed(str(exc))
        return self.reload(new)

    def reload(self, new: ServerConfig) -> bool:
        """Apply ``new``: the storage map and the reloadable settings at once.

        Vdisks opened from now on get their storage cluster from the new map; open vdisks
        keep theirs until they are released. Options outside `RELOADABLE` are reported as
        needing a restart and keep their running values. The config the server goes on
        with is built whole and validated first (`ServerConfig.reloaded`), then swapped in
        for the running one, which is never changed in place: nothing changes if that
        config does not validate (e.g. a reloadable option that the running format
        refuses), or if the new storage map does not fit the running k and m.
        """
        cur = self.config
        changed = changed_options(cur, new)
        live = RELOADABLE if self.tls is not None else RELOADABLE - {"tls_cert", "tls_key"}
        restart = [describe_change(name, cur, new) for name in changed
                   if name not in live and name != "config"]
        if (new.master_key != cur.master_key and not cur.ephemeral_key
                and not {"priv_key", "key_file"} & set(changed)):
            restart.append("master key (the key file's content)")
        applied = [describe_change(name, cur, new) for name in changed if name in live]
        new_map: tuple[ClusterPoolFactory, StorageConfig] | None = None  # to switch to
        if new.storage != cur.storage:
            if isinstance(self.factory, ClusterPoolFactory) and new.storage is not None:
                new_map = (self.factory, new.storage)
            elif new.storage is None:
                restart.append("storage map removed (the running one is kept)")
            else:
                restart.append("storage map (this server runs on --storage-addresses or "
                               "in-memory storage)")
        if new.slave_targets != cur.slave_targets:
            restart.append("slave sync settings (with_slave_sync, slave_server, slave_prefix)")
        try:
            merged = cur.reloaded(new, live, storage=new_map is not None)
        except ConfigError as exc:
            return self.reload_failed(str(exc))
        if new_map is not None:
            factory, storage_map = new_map
            try:
                factory.update(storage_map)  # checked before it is swapped in
            except StorageConfigError as exc:
                return self.reload_failed(f"storage map: {exc}")
            self._note_moved_vdisks(cur, new)
            applied.append(f"storage map ({self.factory.describe()})")
        # Nothing fails from here on: the new config goes in as a whole.
        self.config = merged
        if (merged.retention_default, merged.retention_vdisks) != (cur.retention_default,
                                                                   cur.retention_vdisks):
            applied.append("retention policies")
            self.keeper.reconfigured()
        self.budget.limit = merged.max_server_buffered_bytes
        for vdisk in list(self.vdisks.values()):
            vdisk.apply(merged)
        logs.reconfigure(merged.effective_log_level, merged.log_format)
        applied.extend(self._reload_access(cur, merged))
        self.stats.reloads_ok += 1
        self.stats.last_reload_ok = True
        self.stats.last_reload_time = time.time()
        log.info("config reloaded: %s", ", ".join(applied) if applied else "nothing changed")
        for what in restart:
            log.warning("config reload: %s: takes effect only after a restart", what)
        return True

    def reload_failed(self, reason: str) -> bool:
        """Count and log a config that could not be applied; the running one stays."""
        log.error("config reload rejected, keeping the running config: %s", reason)
        self.stats.reloads_failed += 1
        self.stats.last_reload_ok = False
        self.stats.last_reload_time = time.time()
        return False

    def _note_moved_vdisks(self, cur: ServerConfig, new: ServerConfig) -> None:
        assert new.storage is not None
        for vdisk_id in self.vdisks:
            before = cur.storage.cluster_for(vdisk_id) if cur.storage is not None else None
            after = new.storage.cluster_for(vdisk_id)
            if before != after:
                log.info("storage cluster %s -> %s: the vdisk stays on %s until it is released "
                         "(no client, nothing pending)", before, after, before,
                         extra={"vdisk": vdisk_id})

    def _reload_access(self, old: ServerConfig, new: ServerConfig) -> list[str]:
        """Take the access rules, the old keys and the TLS certificate of ``new``, the
        config swapped in for ``old``.

        Handshakes from now on are checked against the new rules; connections already
        accepted keep running (they were allowed when they came). Returns what changed,
        for the reload's log line. ``new`` was validated: its key and certificate files
        loaded.
        """
        changed = []
        if new.access_policy != self.access:
            self.access = new.access_policy
            changed.append(f"access rules ({len(new.access_policy.vdisks)} vdisk rule(s), "
                           f"default {'/'.join(sorted(new.access_policy.default.modes))})")
        if new.old_keys != old.old_keys:
            self.opener = _opener(new)
            changed.append(f"read keys {_key_ids(self.opener.keyring.ids)}")
        if self.tls is not None and new.tls_cert:
            try:
                # New connections get the new certificate; open ones keep theirs.
                self.tls.load_cert_chain(new.tls_cert, new.tls_key or None)
            except (OSError, ssl.SSLError) as exc:  # changed since it was validated
                log.error("config reload: TLS certificate not reloaded: %s", exc)
            else:
                changed.append("TLS certificate re-read")
        return changed


def _opener(config: ServerConfig) -> RecordOpener:
    """Opens records under the current key and every old one (key rotation)."""
    assert config.master_key is not None
    legacy = (LegacyCipher(config.master_key, config.legacy_nonce)
              if config.legacy_nonce is not None else None)
    return RecordOpener(Keyring.of(config.master_key, *config.old_keys), legacy,
                        "legacy" if legacy is not None else config.storage_format)


def record_version(config: ServerConfig) -> int:
    """The version of the records of ours this server writes: 2 with storage format v2
    (a log an older tlog can still read), else 3."""
    return V2_VERSION if config.storage_format == "v2" else V3_VERSION


def _key_ids(ids: list[int]) -> str:
    return ", ".join(f"{i:08x}" for i in ids) or "none"


def _pool_factory(config: ServerConfig) -> StoragePoolFactory:
    if config.storage is not None and not config.storage_addresses:
        # The map validated with the config, not the file again (it may have changed since).
        return ClusterPoolFactory(config.storage, config.k, config.m, source=config.config)
    return any_pool_factory(k=config.k, m=config.m,
                            addresses=",".join(config.storage_addresses) or None,
                            allow_memory=True)


async def _ping(server: StorageServer) -> str | None:
    """None if ``server`` answers PING within `PING_TIMEOUT`, else why not."""
    try:
        async with asyncio.timeout(PING_TIMEOUT):
            await server.ping()
    except TimeoutError:
        return f"{server.address}: no answer within {PING_TIMEOUT:g} s"
    except Exception as exc:
        text = str(exc)
        return text if server.address in text else f"{server.address}: {text}"
    return None
