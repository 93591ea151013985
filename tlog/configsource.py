"""Where a tlogserver configuration lives: a YAML file, or etcd keys under a prefix
(``etcd://HOST:PORT[,HOST:PORT...]/PREFIX``), read the same way by the daemon (which also
watches them, `tlogserver.etcdsource`) and by every `tlog` command that reads a log.

The one description of the etcd key layout. The keys under PREFIX hold the YAML file's
content, one key per part (after 0-Disk's ``<vdiskID>:vdisk:conf:storage:tlog`` and
``<clusterID>:cluster:conf:storage``), values in YAML:

- ``PREFIX/server``: a mapping of server options (the file's top-level options);
- ``PREFIX/clusters/<clusterID>``: ``servers: [host:port, ...]``;
- ``PREFIX/vdisks/<vdiskID>``: the vdisk's entry (``storage_cluster``, ``access``...);
- ``PREFIX/default_storage_cluster``: a cluster name;
- ``PREFIX/tls_clients``: certificate name -> vdisk patterns;
- ``PREFIX/nbd_servers/<serverID>``: the vdisks an NBD server (``tlog nbd --config``)
  serves, with their settings (after 0-Disk's ``<serverID>:nbdserver:conf:vdisks``;
  `tlog.nbd.hostconfig`).

Beside them the servers keep keys of their own, attached to their etcd leases, which are
not configuration: ``PREFIX/owners/<vdiskID>`` (who flushes the vdisk) and
``PREFIX/servers/<serverID>`` (which server id is in use).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aetcd
import aetcd.exceptions
import yaml

SCHEME = "etcd://"
#: Seconds to wait for etcd per call.
TIMEOUT = 5

SERVER = "server"
DEFAULT_STORAGE_CLUSTER = "default_storage_cluster"
TLS_CLIENTS = "tls_clients"
#: Keys holding one part of the file each (``server``: its options, merged at the top).
SINGLE_KEYS = (SERVER, DEFAULT_STORAGE_CLUSTER, TLS_CLIENTS)
#: Directories of keys, one per entry of the file's mapping named here.
DIRECTORIES = {"clusters": "storage_clusters", "vdisks": "vdisks", "nbd_servers": "nbd_servers"}
#: The file's top-level keys that are not server options (they have keys of their own).
STRUCTURE_KEYS = ("storage_clusters", "vdisks", DEFAULT_STORAGE_CLUSTER, TLS_CLIENTS,
                  "nbd_servers")
#: Directories the servers write, on their leases: vdisk owners and server ids in use.
OWNERS = "owners"
SERVERS = "servers"
LEASE_DIRECTORIES = (OWNERS, SERVERS)


class ConfigError(ValueError):
    """An invalid setting, or a config that cannot be read; the message names it."""


def is_etcd(text: str | None) -> bool:
    """Whether a ``--config`` value names etcd rather than a file."""
    return bool(text) and str(text).startswith(SCHEME)


@dataclass(frozen=True)
class EtcdUrl:
    """``etcd://host:port[,host:port...]/prefix``: the endpoints, tried in turn."""

    endpoints: tuple[tuple[str, int], ...]
    prefix: str

    @classmethod
    def parse(cls, text: str) -> EtcdUrl:
        if not is_etcd(text):
            raise ConfigError(f"config: {text!r} is not an etcd://HOST:PORT/PREFIX address")
        rest = text[len(SCHEME):]
        hosts, _, prefix = rest.partition("/")
        endpoints = []
        for item in hosts.split(","):
            host, _, port = item.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"config: etcd endpoint {item!r} is not host:port")
            endpoints.append((host.strip("[]"), int(port)))
        prefix = "/" + prefix.strip("/")
        if prefix == "/":
            raise ConfigError("config: the etcd address needs a key prefix: "
                              "etcd://HOST:PORT/PREFIX")
        return cls(tuple(endpoints), prefix)

    def __str__(self) -> str:
        hosts = ",".join(f"{h}:{p}" for h, p in self.endpoints)
        return f"{SCHEME}{hosts}{self.prefix}"


def key_path(prefix: str, *parts: str) -> bytes:
    """The full etcd key of ``parts`` (``"vdisks", "vm-1"``) under ``prefix``."""
    return "/".join([prefix.rstrip("/"), *parts]).encode()


def key_name(prefix: str, raw_key: bytes) -> str | None:
    """The name of a full etcd key below ``prefix`` (``vdisks/vm-1``), None outside it."""
    key = bytes(raw_key).decode(errors="replace")
    base = prefix.rstrip("/") + "/"
    return key[len(base):] if key.startswith(base) else None


def is_lease_key(name: str) -> bool:
    """Whether a key name (below the prefix) is one the servers keep on their leases."""
    return name.partition("/")[0] in LEASE_DIRECTORIES


def is_config_key(name: str) -> bool:
    """Whether a key name (below the prefix) is a configuration key of the layout."""
    if name in SINGLE_KEYS:
        return True
    group, _, ident = name.partition("/")
    return group in DIRECTORIES and bool(ident) and "/" not in ident


def parse_value(key: str, raw: bytes) -> Any:
    """A key's YAML value; ConfigError names the key."""
    try:
        return yaml.safe_load(bytes(raw).decode())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"etcd key {key}: not valid YAML: {first}") from None


def assemble(items: Iterable[tuple[bytes, bytes]], prefix: str) -> dict[str, Any]:
    """The keys under ``prefix`` in the YAML file's shape (lease keys left out); errors
    name the key."""
    data: dict[str, Any] = {}
    for raw_key, raw_value in sorted(items):
        name = key_name(prefix, raw_key)
        if name is None or is_lease_key(name):
            continue
        key = bytes(raw_key).decode(errors="replace")
        if name in SINGLE_KEYS:
            value = parse_value(key, raw_value)
            if name == SERVER:
                if value is None:
                    continue
                if not isinstance(value, dict):
                    raise ConfigError(f"etcd key {key}: expected a mapping of server options")
                for option in value:
                    if str(option) in (*STRUCTURE_KEYS, "config"):
                        raise ConfigError(f"etcd key {key}: {option!r} has its own key, not "
                                          "a server option")
                data.update(value)
            else:
                data[name] = value
            continue
        if is_config_key(name):
            group, _, ident = name.partition("/")
            data.setdefault(DIRECTORIES[group], {})[ident] = parse_value(key, raw_value)
            continue
        raise ConfigError(f"etcd key {key}: unknown key (expected server, clusters/<id>, "
                          "vdisks/<id>, nbd_servers/<id>, default_storage_cluster or "
                          "tls_clients)")
    return data


def split(data: Mapping[str, Any]) -> dict[str, Any]:
    """The YAML file's content as key name -> value, the inverse of `assemble` (the server
    options go together into ``server``)."""
    keys: dict[str, Any] = {}
    options = {k: v for k, v in data.items() if k not in STRUCTURE_KEYS}
    if options:
        keys[SERVER] = options
    for directory, group in DIRECTORIES.items():
        entries = data.get(group)
        if entries is None:
            continue
        if not isinstance(entries, Mapping):
            raise ConfigError(f"{group}: expected a mapping of id -> entry")
        for ident, entry in entries.items():
            ident = str(ident)
            if not ident or "/" in ident:
                raise ConfigError(f"{group}: {ident!r} cannot be an etcd key name")
            keys[f"{directory}/{ident}"] = entry
    for single in (DEFAULT_STORAGE_CLUSTER, TLS_CLIENTS):
        if single in data:
            keys[single] = data[single]
    return keys


def dump_value(value: Any) -> bytes:
    """A key's value as written: YAML, block style, keys in the order given."""
    return yaml.safe_dump(value, default_flow_style=False, sort_keys=False).encode()


def load_yaml_file(path: str) -> dict[str, Any]:
    """Read a YAML config file; ConfigError names the file on any problem."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path}: not valid YAML: {exc}".splitlines()[0]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping")
    return data


class EtcdStore:
    """A connection to the etcd of a config source (endpoints tried in turn), and the
    reading of its keys."""

    def __init__(self, url: EtcdUrl) -> None:
        self.url = url
        self._client: aetcd.Client | None = None
        self._endpoint = 0

    async def client(self) -> aetcd.Client:
        """A connected client, trying the endpoints in turn; ConfigError when none
        answers."""
        if self._client is not None:
            return self._client
        errors = []
        for _ in range(len(self.url.endpoints)):
            host, port = self.url.endpoints[self._endpoint]
            client = aetcd.Client(host=host, port=port, timeout=TIMEOUT)
            try:
                await client.connect()
                await client.get(key_path(self.url.prefix, SERVER))
            except (aetcd.exceptions.ClientError, OSError) as exc:
                errors.append(f"{host}:{port}: {exc}")
                await client.close()
                self._endpoint = (self._endpoint + 1) % len(self.url.endpoints)
                continue
            self._client = client
            return client
        raise ConfigError(f"etcd unreachable: {'; '.join(errors)}")

    async def drop(self) -> None:
        """Close the connection (the next call connects again)."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def items(self) -> list[tuple[bytes, bytes]]:
        """Every key under the prefix with its value, lease keys included."""
        client = await self.client()
        try:
            found = await client.get_prefix(key_path(self.url.prefix, ""))
        except (aetcd.exceptions.ClientError, OSError) as exc:
            await self.drop()
            raise ConfigError(f"etcd unreachable: {exc}") from None
        return [(bytes(kv.key), bytes(kv.value)) for kv in found]

    async def load(self) -> dict[str, Any]:
        """Every configuration key, in the YAML file's shape; ConfigError when etcd cannot
        be read or a key is wrong."""
        return assemble(await self.items(), self.url.prefix)

    async def close(self) -> None:
        await self.drop()


def load_etcd(url: EtcdUrl) -> dict[str, Any]:
    """The configuration keys, read once (with an event loop of its own)."""
    async def read() -> dict[str, Any]:
        store = EtcdStore(url)
        try:
            return await store.load()
        finally:
            await store.close()
    return asyncio.run(read())


def load_config(source: str) -> dict[str, Any]:
    """A ``--config`` value's content in the YAML file's shape: the file read, or etcd's
    keys; ConfigError names what is wrong."""
    if is_etcd(source):
        return load_etcd(EtcdUrl.parse(source))
    return load_yaml_file(source)


def describe_empty(source: str) -> str:
    """Why a config source holds nothing, for an error message."""
    if is_etcd(source):
        prefix = EtcdUrl.parse(source).prefix
        return f"no configuration keys under {prefix} (is the prefix right?)"
    return "the file is empty"
