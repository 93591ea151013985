"""What a served vdisk is configured with, checked once: by ``tlog nbd`` before it starts
nbdkit (so a mistake is one clear line, not an nbdkit failure), and again by the plugin,
which receives the same settings as nbdkit ``key=value`` arguments."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tlog.client import parse_address
from tlog.storage import ServerAddress
from tlog.storage.blockstore import default_prefix
from tlog.units import parse_size

from .backend import Backend, FileBackend, RedisBackend
from .disk import (
    DEFAULT_CHECKPOINT_BYTES,
    DEFAULT_FAILOVER_TIMEOUT,
    DEFAULT_FLUSH_TIMEOUT,
    DEFAULT_WRITE_TIMEOUT,
    LoggedDisk,
)


class SettingsError(ValueError):
    """A setting that cannot work, with the key named."""


@dataclass
class NbdSettings:
    """One export: the vdisk, its tlog servers, its backend, the waits."""

    vdisk: str = ""
    servers: list[str] = field(default_factory=list)
    image: str = ""
    size: int = 0
    block_size: int = 4096
    backend: str = "file"
    redis: str = ""
    redis_key_prefix: str = ""
    readonly: bool = False
    write_timeout: float = DEFAULT_WRITE_TIMEOUT
    flush_timeout: float = DEFAULT_FLUSH_TIMEOUT
    connect_timeout: float = 30.0
    tls: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    token_file: str = ""
    #: the standby block store slave sync keeps in step (redis layout); "" = none
    standby: str = ""
    standby_key_prefix: str = ""
    failover_timeout: float = DEFAULT_FAILOVER_TIMEOUT
    #: where the image's state and intent log are kept ("": beside the image)
    state_file: str = ""
    #: take a device with no state for the vdisk as its log is (once, by the operator's word)
    adopt: bool = False
    #: bytes written between two background checkpoints
    checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES
    #: host:port of the export's /metrics ("": none)
    metrics_address: str = ""

    def set(self, key: str, value: str) -> None:
        """One nbdkit ``key=value`` argument."""
        name = key.replace("-", "_")
        try:
            if name == "server":
                self.servers.append(value)
            elif name in ("size", "checkpoint_bytes"):
                try:
                    setattr(self, name, parse_size(value))
                except ValueError as exc:
                    raise SettingsError(f"{key}: {exc}") from None
            elif name == "block_size":
                self.block_size = int(value)
            elif name in ("write_timeout", "flush_timeout", "connect_timeout",
                          "failover_timeout"):
                setattr(self, name, float(value))
            elif name in ("readonly", "tls", "adopt"):
                setattr(self, name, value.lower() in ("1", "true", "yes", "on"))
            elif name in ("vdisk", "image", "backend", "redis", "redis_key_prefix", "tls_ca",
                          "tls_cert", "tls_key", "token_file", "standby",
                          "standby_key_prefix", "state_file", "metrics_address"):
                setattr(self, name, value)
            else:
                raise SettingsError(f"unknown key {key!r}")
        except ValueError as exc:
            if isinstance(exc, SettingsError):
                raise
            raise SettingsError(f"{key}: {value!r} is not valid") from None

    def arguments(self) -> list[str]:
        """The nbdkit ``key=value`` arguments that rebuild these settings in the plugin."""
        out = [f"vdisk={self.vdisk}", *(f"server={s}" for s in self.servers),
               f"size={self.size}", f"block-size={self.block_size}", f"backend={self.backend}",
               f"readonly={int(self.readonly)}", f"write-timeout={self.write_timeout}",
               f"flush-timeout={self.flush_timeout}",
               f"connect-timeout={self.connect_timeout}", f"tls={int(self.tls)}",
               f"failover-timeout={self.failover_timeout}", f"adopt={int(self.adopt)}",
               f"checkpoint-bytes={self.checkpoint_bytes}"]
        for key in ("image", "redis", "redis_key_prefix", "tls_ca", "tls_cert", "tls_key",
                    "token_file", "standby", "standby_key_prefix", "state_file",
                    "metrics_address"):
            value = getattr(self, key)
            if value:
                out.append(f"{key.replace('_', '-')}={value}")
        return out

    def check(self, local: bool = True) -> None:
        """Everything that can be checked without connecting; raises SettingsError.
        ``local=False``: not the files either (a fleet's config, checked on another
        machine than the one serving it)."""
        if not self.vdisk:
            raise SettingsError("vdisk: the vdisk id is required")
        if self.block_size < 512 or self.block_size & (self.block_size - 1):
            raise SettingsError(f"block-size: {self.block_size} is not a power of two >= 512")
        if self.size < 0 or self.size % self.block_size:
            raise SettingsError(f"size: {self.size} is not a multiple of the block size "
                                f"{self.block_size}")
        for name in ("write_timeout", "flush_timeout", "connect_timeout", "failover_timeout"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name.replace('_', '-')}: must be > 0 seconds")
        if self.metrics_address:
            try:
                parse_address(self.metrics_address)
            except ValueError as exc:
                raise SettingsError(f"metrics-address: {exc}") from None
        if self.checkpoint_bytes < self.block_size:
            raise SettingsError(f"checkpoint-bytes: at least a block ({self.block_size})")
        if not self.readonly:
            if not self.servers:
                raise SettingsError("server: at least one tlogserver address is needed "
                                    "(or serve --readonly)")
            for server in self.servers:
                try:
                    parse_address(server)
                except ValueError as exc:
                    raise SettingsError(f"server: {exc}") from None
        if self.backend == "file":
            if not self.image:
                raise SettingsError("image: the image file is required with the file backend")
            if not local:
                pass
            elif self.readonly and not os.path.exists(self.image):
                raise SettingsError(f"image: {self.image} does not exist")
            elif not self.size and not os.path.exists(self.image):
                raise SettingsError("size: a new image needs its size")
            if (local and not self.readonly and not self.state_file and os.path.exists(self.image)
                    and not os.path.isfile(self.image)):
                raise SettingsError(f"state-file: {self.image} is not a regular file: say "
                                    "where to keep its tlog state (--state-file)")
        elif self.backend == "redis":
            if not self.redis:
                raise SettingsError("redis: the block store's address is needed with the "
                                    "redis backend")
            try:
                ServerAddress.parse(self.redis)
            except ValueError as exc:
                raise SettingsError(f"redis: {exc}") from None
            if not self.size:
                raise SettingsError("size: the redis backend needs the vdisk's size")
        else:
            raise SettingsError(f"backend: {self.backend!r} is not file or redis")
        if self.standby:
            try:
                ServerAddress.parse(self.standby)
            except ValueError as exc:
                raise SettingsError(f"standby: {exc}") from None
            if not self.size:
                raise SettingsError("size: a standby needs the vdisk's size")
        for name in ("tls_ca", "tls_cert", "tls_key", "token_file"):
            path = getattr(self, name)
            if local and path and not os.path.isfile(path):
                raise SettingsError(f"{name.replace('_', '-')}: {path} is not a file")

    def describe(self, disk: LoggedDisk) -> str:
        mode = "read-only" if disk.readonly else (
            f"logged to {', '.join(self.servers)} from sequence "
            f"{disk.client.next_sequence if disk.client else 0}")
        return (f"vdisk {self.vdisk}: {disk.size} bytes in blocks of {disk.block_size} from "
                f"{disk.backend.describe()}, {mode}")


def open_backend(settings: NbdSettings) -> Backend:
    if settings.backend == "redis":
        prefix = settings.redis_key_prefix or default_prefix(settings.vdisk)
        return RedisBackend(ServerAddress.parse(settings.redis), prefix, settings.block_size,
                            settings.size)
    return FileBackend(settings.image, settings.block_size, settings.size, settings.readonly)


def open_standby(settings: NbdSettings, size: int) -> Backend:
    """The standby block store a failover switches to: a redis backend like ``--redis``
    (same address syntax, login and TLS), its keys under ``standby_key_prefix``."""
    prefix = settings.standby_key_prefix or default_prefix(settings.vdisk)
    return RedisBackend(ServerAddress.parse(settings.standby), prefix, settings.block_size,
                        size)
