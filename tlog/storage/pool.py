"""The storage pool of a vdisk (its k data + m parity servers) and the factories that give
each vdisk its pool, chosen like the reference's ``AnyRedisPoolFactory``: a static list of
addresses, the YAML storage map, or the embedded in-memory storage."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence

from .address import (
    ServerAddress,
    StorageConfigError,
    check_unique,
    describe_addresses,
    parse_addresses,
    split_items,
)
from .memoryserver import MemoryStorageServer
from .redisserver import RedisStorageServer
from .server import StorageError, StorageServer
from .storagemap import StorageConfig, load_storage_config


class StoragePool:
    """The k+m servers of one vdisk: piece ``i`` of every aggregation goes to ``servers[i]``."""

    def __init__(
        self, servers: Sequence[StorageServer], k: int, m: int, *, owns_servers: bool = True
    ) -> None:
        if k < 1 or m < 0:
            raise StorageConfigError(f"k={k}, m={m}: need k >= 1 and m >= 0")
        if len(servers) != k + m:
            raise StorageConfigError(f"{len(servers)} storage servers given, k+m = {k + m} needed")
        self.servers: list[StorageServer] = list(servers)
        self.k = k
        self.m = m
        # Pools handed out by a factory share its server clients; the factory closes them.
        self._owns_servers = owns_servers

    def __repr__(self) -> str:
        addresses = ", ".join(s.address for s in self.servers)
        return f"StoragePool(k={self.k}, m={self.m}, [{addresses}])"

    @property
    def is_memory(self) -> bool:
        """True when every server is the in-process storage."""
        return all(isinstance(s, MemoryStorageServer) for s in self.servers)

    def detached(self, socket_timeout: float = 30.0) -> StoragePool:
        """The same servers over connections of its own (closed with the pool), for
        background work (compaction) that must not queue behind, or ahead of, the flushes
        on the shared connections. In-memory servers are shared as they are."""
        servers: list[StorageServer] = [
            RedisStorageServer(s.server_address, socket_timeout=socket_timeout)
            if isinstance(s, RedisStorageServer) else s for s in self.servers]
        return StoragePool(servers, self.k, self.m, owns_servers=not self.is_memory)

    async def close(self) -> None:
        """Close the servers if this pool owns them (not for pools from a factory)."""
        if self._owns_servers:
            await asyncio.gather(*(s.close() for s in self.servers))


def _check_k_m(k: int, m: int) -> None:
    if k < 1 or m < 0:
        raise StorageConfigError(f"k={k}, m={m}: need k >= 1 and m >= 0")


class StoragePoolFactory(abc.ABC):
    """Gives each vdisk its storage pool."""

    k: int
    m: int

    @abc.abstractmethod
    def pool_for(self, vdisk_id: str) -> StoragePool:
        """The pool of ``vdisk_id``; StorageConfigError if it has no storage cluster."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every server client this factory created."""

    @property
    def is_memory(self) -> bool:
        """True for the embedded in-memory storage."""
        return False

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for the logs."""

    def servers(self) -> list[StorageServer]:
        """Every server this factory can hand out a pool of (for health checks)."""
        return []


class StaticPoolFactory(StoragePoolFactory):
    """The same k+m servers for every vdisk."""

    def __init__(
        self,
        addresses: Sequence[ServerAddress],
        k: int,
        m: int,
        *,
        socket_timeout: float = 10.0,
    ) -> None:
        _check_k_m(k, m)
        if len(addresses) != k + m:
            raise StorageConfigError(
                f"{len(addresses)} storage servers given, k+m = {k + m} needed"
            )
        check_unique(addresses)
        self.k, self.m = k, m
        self.addresses = list(addresses)
        servers = [RedisStorageServer(a, socket_timeout=socket_timeout) for a in addresses]
        self._pool = StoragePool(servers, k, m, owns_servers=False)

    def pool_for(self, vdisk_id: str) -> StoragePool:
        return self._pool

    def servers(self) -> list[StorageServer]:
        return list(self._pool.servers)

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self._pool.servers))

    def describe(self) -> str:
        return (
            f"{len(self.addresses)} redis servers {describe_addresses(self.addresses)} "
            f"(k={self.k}, m={self.m})"
        )


class MemoryPoolFactory(StoragePoolFactory):
    """One in-memory pool shared by every vdisk (keys are hashes, lists are per vdisk)."""

    def __init__(self, k: int, m: int) -> None:
        _check_k_m(k, m)
        self.k, self.m = k, m
        servers = [MemoryStorageServer(f"memory-{i}") for i in range(k + m)]
        self._pool = StoragePool(servers, k, m, owns_servers=False)

    def pool_for(self, vdisk_id: str) -> StoragePool:
        return self._pool

    def servers(self) -> list[StorageServer]:
        return list(self._pool.servers)

    async def close(self) -> None:
        return None

    @property
    def is_memory(self) -> bool:
        return True

    def describe(self) -> str:
        return f"{self.k + self.m} in-memory storage servers (k={self.k}, m={self.m})"


class ClusterPoolFactory(StoragePoolFactory):
    """Each vdisk gets the servers of its storage cluster, as the config says.

    Clients are shared per address across clusters and vdisks. A cluster with more than k+m
    servers uses its first k+m.
    """

    def __init__(
        self,
        config: StorageConfig,
        k: int,
        m: int,
        *,
        source: str | None = None,
        socket_timeout: float = 10.0,
    ) -> None:
        _check_k_m(k, m)
        self.k, self.m = k, m
        self.source = source
        self._socket_timeout = socket_timeout
        self._check(config)
        self._config = config
        self._servers: dict[ServerAddress, RedisStorageServer] = {}
        self._closed = False

    @property
    def config(self) -> StorageConfig:
        """The current vdisk -> cluster map."""
        return self._config

    def _check(self, config: StorageConfig) -> None:
        required = self.k + self.m
        for name, addresses in config.clusters.items():
            if len(addresses) < required:
                raise StorageConfigError(
                    f"storage_clusters.{name}.servers: {len(addresses)} servers given, "
                    f"k+m = {required} needed"
                )
        for vdisk_id, name in config.vdisks.items():
            if name not in config.clusters:
                raise StorageConfigError(
                    f"vdisks.{vdisk_id}.storage_cluster: unknown storage cluster {name!r}"
                )
        if config.default_cluster is not None and config.default_cluster not in config.clusters:
            raise StorageConfigError(
                f"default_storage_cluster: unknown storage cluster {config.default_cluster!r}"
            )

    def update(self, config: StorageConfig) -> None:
        """Swap the map (config reload); pools already handed out keep their servers."""
        self._check(config)
        self._config = config

    def _server(self, address: ServerAddress) -> RedisStorageServer:
        server = self._servers.get(address)
        if server is None:
            server = RedisStorageServer(address, socket_timeout=self._socket_timeout)
            self._servers[address] = server
        return server

    def pool_for(self, vdisk_id: str) -> StoragePool:
        if self._closed:
            raise StorageError("storage pool factory is closed")
        config = self._config
        name = config.cluster_for(vdisk_id)
        if name is None:
            raise StorageConfigError(
                f"vdisk {vdisk_id!r}: no storage cluster configured for it "
                "(and no default_storage_cluster)"
            )
        addresses = config.clusters[name][: self.k + self.m]
        servers = [self._server(a) for a in addresses]
        return StoragePool(servers, self.k, self.m, owns_servers=False)

    def servers(self) -> list[StorageServer]:
        """The servers of every configured cluster (those a vdisk may be given)."""
        if self._closed:
            return []
        seen: dict[ServerAddress, StorageServer] = {}
        for addresses in self._config.clusters.values():
            for address in addresses[: self.k + self.m]:
                seen.setdefault(address, self._server(address))
        return list(seen.values())

    async def close(self) -> None:
        self._closed = True
        servers = list(self._servers.values())
        await asyncio.gather(*(s.close() for s in servers))

    def describe(self) -> str:
        config = self._config
        default = f", default cluster {config.default_cluster}" if config.default_cluster else ""
        source = f" from {self.source}" if self.source else ""
        return (
            f"storage clusters{source}: {len(config.clusters)} clusters, "
            f"{len(config.vdisks)} vdisks{default} (k={self.k}, m={self.m})"
        )


def any_pool_factory(
    *,
    k: int,
    m: int,
    addresses: str | Sequence[str] | None = None,
    config_path: str | None = None,
    allow_memory: bool = True,
    autofill: bool = True,
) -> StoragePoolFactory:
    """Pick the storage like the reference: addresses, else a config file, else in-memory."""
    _check_k_m(k, m)
    if addresses is not None and split_items(addresses):
        return StaticPoolFactory(parse_addresses(addresses, k + m, autofill), k, m)
    if config_path:
        config = load_storage_config(config_path, required=k + m)
        return ClusterPoolFactory(config, k, m, source=config_path)
    if allow_memory:
        return MemoryPoolFactory(k, m)
    raise StorageConfigError(
        "no storage given: pass storage server addresses or a config file "
        "(in-memory storage is not allowed here)"
    )
