"""etcd as the configuration source: ``--config etcd://HOST:PORT[,HOST:PORT...]/PREFIX``.

The keys under PREFIX hold the same settings as the YAML file, one key per part (modelled
on 0-Disk's ``<vdiskID>:vdisk:conf:storage:tlog`` and ``<clusterID>:cluster:conf:storage``):

- ``PREFIX/server``: a YAML mapping of server options (the file's top-level options);
- ``PREFIX/clusters/<clusterID>``: a YAML mapping, ``servers: [host:port, ...]``;
- ``PREFIX/vdisks/<vdiskID>``: a YAML mapping, the vdisk's entry (``storage_cluster``,
  ``access``, ``token_hash``, ``slave_sync``...);
- ``PREFIX/default_storage_cluster``: a cluster name;
- ``PREFIX/tls_clients``: a YAML mapping, certificate name -> vdisk patterns.

`EtcdSource.load` reads them into the YAML file's shape, which `tlogserver.config` turns
into a `ServerConfig` as it does a file; `EtcdSource.watch` follows changes, so a change
applies to new handshakes at once. A change that does not validate is logged and ignored
(the running config stays); while etcd cannot be reached the last good config stays and
`/readyz` says why.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aetcd
import aetcd.exceptions
import yaml

from .config import ConfigError

log = logging.getLogger("tlogserver")

SCHEME = "etcd://"
#: Seconds to wait for etcd per call, and the longest pause between reconnection attempts.
TIMEOUT = 5
RETRY_MAX = 5.0
#: Changes arriving together are applied as one reload after this pause.
SETTLE = 0.05
_SINGLE = ("server", "default_storage_cluster", "tls_clients")
_DIRS = {"clusters": "storage_clusters", "vdisks": "vdisks"}


def is_etcd(text: str | None) -> bool:
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
    return "/".join([prefix, *parts]).encode()


def _yaml(key: str, raw: bytes) -> Any:
    try:
        return yaml.safe_load(raw.decode())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"etcd key {key}: not valid YAML: {first}") from None


def assemble(items: list[tuple[bytes, bytes]], prefix: str) -> dict[str, Any]:
    """The keys under ``prefix`` in the YAML file's shape; errors name the key."""
    data: dict[str, Any] = {}
    base = prefix.rstrip("/") + "/"
    for raw_key, raw_value in sorted(items):
        key = raw_key.decode(errors="replace")
        if not key.startswith(base):
            continue
        name = key[len(base):]
        if name.startswith("owners/"):
            continue  # vdisk ownership leases, not configuration
        if name in _SINGLE:
            value = _yaml(key, raw_value)
            if name == "server":
                if value is None:
                    continue
                if not isinstance(value, dict):
                    raise ConfigError(f"etcd key {key}: expected a mapping of server options")
                for option in value:
                    if str(option) in ("storage_clusters", "vdisks", "default_storage_cluster",
                                       "tls_clients", "config"):
                        raise ConfigError(f"etcd key {key}: {option!r} has its own key, not "
                                          "a server option")
                data.update(value)
            else:
                data[name] = value
            continue
        group, _, ident = name.partition("/")
        if group in _DIRS and ident and "/" not in ident:
            data.setdefault(_DIRS[group], {})[ident] = _yaml(key, raw_value)
            continue
        raise ConfigError(f"etcd key {key}: unknown key (expected server, clusters/<id>, "
                          "vdisks/<id>, default_storage_cluster or tls_clients)")
    return data


class EtcdSource:
    """Reads and watches the configuration keys; remembers whether etcd answers."""

    def __init__(self, url: EtcdUrl) -> None:
        self.url = url
        self.error = ""  # why etcd cannot be read now ("" while it can)
        self._client: aetcd.Client | None = None
        self._endpoint = 0
        self._wake = asyncio.Event()

    async def client(self) -> aetcd.Client:
        """A connected client, trying the endpoints in turn."""
        if self._client is not None:
            return self._client
        errors = []
        for _ in range(len(self.url.endpoints)):
            host, port = self.url.endpoints[self._endpoint]
            client = aetcd.Client(host=host, port=port, timeout=TIMEOUT)
            try:
                await client.connect()
                await client.get(key_path(self.url.prefix, "server"))
            except (aetcd.exceptions.ClientError, OSError) as exc:
                errors.append(f"{host}:{port}: {exc}")
                await client.close()
                self._endpoint = (self._endpoint + 1) % len(self.url.endpoints)
                continue
            self._client = client
            return client
        raise ConfigError(f"etcd unreachable: {'; '.join(errors)}")

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def load(self) -> dict[str, Any]:
        """Every configuration key, in the YAML file's shape; ConfigError when etcd cannot
        be read or a key is wrong."""
        client = await self.client()
        try:
            found = await client.get_prefix(key_path(self.url.prefix, ""))
        except (aetcd.exceptions.ClientError, OSError) as exc:
            await self._drop()
            raise ConfigError(f"etcd unreachable: {exc}") from None
        return assemble([(kv.key, kv.value) for kv in found], self.url.prefix)

    def reload_now(self) -> None:
        """Read everything again at once (SIGHUP)."""
        self._wake.set()

    async def watch(self, apply: Callable[[dict[str, Any]], None]) -> None:
        """Forever: wait for a change under the prefix, read everything, ``apply`` it.
        While etcd is unreachable, retry with backoff; when it is back, read everything
        (changes made meanwhile are not missed)."""
        delay = 0.1
        while True:
            try:
                client = await self.client()
                watch = await client.watch_prefix(key_path(self.url.prefix, ""))
                if self.error:
                    log.info("config source %s reachable again", self.url)
                    self.error = ""
                    apply(await self.load())  # what changed while it was away
                delay = 0.1
                await self._follow(watch, apply)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd gone (or a bug): keep the last good config
                message = str(exc) or type(exc).__name__
                if not self.error:
                    log.error("config source %s unreachable, keeping the running config: %s",
                              self.url, message)
                self.error = message
                await self._drop()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    async def _follow(self, watch: Any, apply: Callable[[dict[str, Any]], None]) -> None:
        events = watch.__aiter__()
        waiter: asyncio.Future[Any] | None = None
        try:
            while True:
                if waiter is None:
                    waiter = asyncio.ensure_future(events.__anext__())
                woken = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait({waiter, woken}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()
                if waiter.done():
                    waiter.result()  # raises when the stream broke
                    waiter = None
                    await asyncio.sleep(SETTLE)  # a burst of changes: one reload
                self._wake.clear()
                try:
                    data = await self.load()
                except ConfigError as exc:
                    if "unreachable" in str(exc):
                        raise
                    log.error("config reload rejected, keeping the running config: %s", exc)
                    continue
                apply(data)
        finally:
            # Left while the next event is awaited (a stop, a broken stream): that read
            # ends when the watch is dropped, and its outcome is of no interest.
            if waiter is not None:
                waiter.cancel()
                waiter.add_done_callback(_ignore_outcome)

    async def close(self) -> None:
        await self._drop()


def _ignore_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def load_at_start(url: EtcdUrl) -> dict[str, Any]:
    """The configuration keys, read once before the server starts (its own event loop)."""
    async def read() -> dict[str, Any]:
        source = EtcdSource(url)
        try:
            return await source.load()
        finally:
            await source.close()
    return asyncio.run(read())
