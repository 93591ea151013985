"""A server's place in a fleet behind etcd: its ownership lease taken at start (its id
registered on it), and what the metrics show of etcd and of the lease."""

from __future__ import annotations

import socket
from collections.abc import Callable

from .config import ServerConfig
from .etcdsource import EtcdSource
from .ownership import Ownership


async def join_fleet(source: EtcdSource, config: ServerConfig,
                     on_lost: Callable[[str], None]) -> Ownership:
    """The server's lease, its id registered on it (``--server-id``, by default
    hostname:port), kept alive from now on; raises ServerIdInUse (a ConfigError) when
    another live server has the id."""
    ownership = Ownership(source, config.server_id or f"{socket.gethostname()}:{config.port}",
                          f"{config.host}:{config.port}", config.owner_lease_ttl,
                          on_lost=on_lost)
    await ownership.start()
    return ownership


def fleet_gauges(source: EtcdSource | None, ownership: Ownership | None) -> dict[str, float]:
    """With an etcd config: whether etcd answers and whether the lease is held (metrics);
    empty without."""
    if source is None:
        return {}
    gauges = {"config_source_up": float(not source.error)}
    if ownership is not None:
        gauges.update(ownership_lease_held=float(ownership.held),
                      ownership_leases_lost=float(ownership.leases_lost),
                      vdisks_owned=float(len(ownership.owned)))
    return gauges


def fleet_unready(source: EtcdSource | None, ownership: Ownership | None) -> str | None:
    """Why ``/readyz`` says no because of etcd: the config source unreachable, or the lease
    not held (no vdisk can be taken on); None when neither."""
    if source is not None and source.error:
        return f"config source unreachable (running on the last good config): {source.error}"
    if ownership is not None and not ownership.held:
        return "ownership lease not held: no vdisk can be taken on"
    return None
