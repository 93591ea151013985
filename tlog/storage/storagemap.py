"""The storage map (the YAML config's ``storage_clusters`` and ``vdisks``): which vdisk
uses which cluster of servers, parsed and checked with messages naming the key."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from .address import ServerAddress, StorageConfigError, check_unique, split_items


@dataclass(frozen=True)
class StorageConfig:
    """Storage clusters and which vdisk uses which (from the YAML config file)."""

    clusters: dict[str, list[ServerAddress]]
    vdisks: dict[str, str]
    default_cluster: str | None = None

    def cluster_for(self, vdisk_id: str) -> str | None:
        """The cluster name of ``vdisk_id`` (or the default), None when it has none."""
        return self.vdisks.get(vdisk_id, self.default_cluster)




_CLUSTER_KEYS = frozenset({"servers"})
#: A vdisk's access settings, next to its storage cluster in the same entry; tlogserver's
#: access control reads them (`tlogserver.access`), the storage map ignores them.
VDISK_ACCESS_KEYS = frozenset({"access", "token_hash"})
#: A vdisk's slave sync settings (`tlog.read.standby`), ignored here as well.
VDISK_SLAVE_KEYS = frozenset({"slave_sync", "slave_server", "slave_prefix"})
#: A vdisk's retention policy (`tlog.retention.policy`), ignored here as well.
VDISK_RETENTION_KEYS = frozenset({"retention"})
_OTHER_KEYS = VDISK_ACCESS_KEYS | VDISK_SLAVE_KEYS | VDISK_RETENTION_KEYS
_VDISK_KEYS = frozenset({"storage_cluster"}) | _OTHER_KEYS


def _name(key: object, path: str) -> str:
    """A cluster or vdisk name from a YAML key (YAML reads ``123`` as an int)."""
    if isinstance(key, str) and key:
        return key
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key)
    raise StorageConfigError(f"{path}: {key!r} is not a valid name")


def _mapping(value: object, path: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise StorageConfigError(f"{path}: expected a mapping, not {type(value).__name__}")
    return value


def _unknown_keys(section: Mapping[Any, Any], allowed: frozenset[str], path: str) -> None:
    for key in section:
        if key not in allowed:
            raise StorageConfigError(f"{path}.{key}: unknown key")


def _parse_cluster(name: str, value: object) -> list[ServerAddress]:
    path = f"storage_clusters.{name}"
    section = _mapping(value, path)
    _unknown_keys(section, _CLUSTER_KEYS, path)
    if "servers" not in section:
        raise StorageConfigError(f"{path}.servers: missing")
    raw = section["servers"]
    if isinstance(raw, str):
        raw = split_items(raw)
    if not isinstance(raw, list):
        raise StorageConfigError(f"{path}.servers: expected a list of host:port[@db]")
    addresses = []
    for i, item in enumerate(raw):
        try:
            addresses.append(ServerAddress.parse(item))
        except StorageConfigError as exc:
            raise StorageConfigError(f"{path}.servers[{i}]: {exc}") from None
    check_unique(addresses, f"{path}.servers: ")
    return addresses


def parse_storage_config(data: Mapping[str, Any], required: int | None = None) -> StorageConfig:
    """Build a :class:`StorageConfig` from the loaded YAML mapping.

    Reads ``storage_clusters``, ``vdisks`` and ``default_storage_cluster``; other top-level
    keys belong to the server's config and are ignored here, and so are the access and
    slave sync settings of a vdisk's entry (`VDISK_ACCESS_KEYS`, `VDISK_SLAVE_KEYS`; an
    entry with only those uses the default cluster). ``required`` (k+m) is the
    minimum number of servers per cluster.
    """
    top = _mapping(data, "storage config")
    if top.get("storage_clusters") is None:
        raise StorageConfigError("storage_clusters: missing")
    clusters: dict[str, list[ServerAddress]] = {}
    for key, value in _mapping(top["storage_clusters"], "storage_clusters").items():
        name = _name(key, "storage_clusters")
        clusters[name] = _parse_cluster(name, value)

    vdisks: dict[str, str] = {}
    raw_vdisks = top.get("vdisks")
    for key, value in _mapping({} if raw_vdisks is None else raw_vdisks, "vdisks").items():
        vdisk_id = _name(key, "vdisks")
        path = f"vdisks.{vdisk_id}"
        section = _mapping({} if value is None else value, path)
        _unknown_keys(section, _VDISK_KEYS, path)
        cluster = section.get("storage_cluster")
        if cluster is None:
            if section.keys() & _OTHER_KEYS:
                continue  # only access, slave or retention settings: the default cluster
            raise StorageConfigError(f"{path}.storage_cluster: missing")
        cluster = _name(cluster, f"{path}.storage_cluster")
        if cluster not in clusters:
            raise StorageConfigError(f"{path}.storage_cluster: unknown storage cluster {cluster!r}")
        vdisks[vdisk_id] = cluster

    default = top.get("default_storage_cluster")
    if default is not None:
        default = _name(default, "default_storage_cluster")
        if default not in clusters:
            raise StorageConfigError(
                f"default_storage_cluster: unknown storage cluster {default!r}"
            )
    # Sizes last: a vdisk naming a missing cluster is the more basic mistake to report.
    for name, addresses in clusters.items():
        if required is not None and len(addresses) < required:
            raise StorageConfigError(
                f"storage_clusters.{name}.servers: {len(addresses)} servers given, "
                f"k+m = {required} needed"
            )
    return StorageConfig(clusters=clusters, vdisks=vdisks, default_cluster=default)


def load_storage_config(path: str, required: int | None = None) -> StorageConfig:
    """Read and check the storage part of a YAML config file; errors name the file."""
    try:
        with open(path, encoding="utf-8") as stream:
            data = yaml.safe_load(stream)
    except OSError as exc:
        raise StorageConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise StorageConfigError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        raise StorageConfigError(f"{path}: empty config file")
    try:
        return parse_storage_config(data, required)
    except StorageConfigError as exc:
        raise StorageConfigError(f"{path}: {exc}") from None
