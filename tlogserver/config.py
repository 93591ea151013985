"""The server's configuration: one typed object, validated once.

Values come from, in order of precedence: command-line flags, ``TLOG_*``
environment variables (click folds both in), the YAML file given with
``--config``, and the defaults below. `ServerConfig.validate` checks everything
and raises `ConfigError` with a one-line message naming the bad setting.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from tlog import crypto
from tlog.protocol import DEFAULT_MAX_MESSAGE_SIZE
from tlog.storage import (
    ServerAddress,
    StorageConfig,
    StorageConfigError,
    parse_addresses,
    parse_storage_config,
)

log = logging.getLogger(__name__)

#: YAML keys that are not server options but the storage map (see tlog.storage).
STORAGE_KEYS = ("storage_clusters", "vdisks", "default_storage_cluster")
LOG_LEVELS = ("debug", "info", "warning", "error")
#: Options a SIGHUP applies to the running server; the others need a restart.
RELOADABLE = frozenset({"flush_size", "flush_time", "max_buffered_blocks", "max_buffered_bytes",
                        "handshake_timeout", "drain_timeout", "verbose", "log_level",
                        "log_format"})
#: Options whose values are never logged, not even when they change.
SECRET = frozenset({"priv_key", "nonce"})


class ConfigError(ValueError):
    """An invalid setting; the message names it."""


@dataclass
class ServerConfig:
    address: str = "0.0.0.0:11211"
    storage_addresses: list[str] = field(default_factory=list)
    memory_storage: bool = False
    config: str | None = None
    k: int = 4
    m: int = 2
    flush_size: int = 25
    flush_time: float = 25.0
    block_size: int = 4096
    priv_key: str | None = field(default=None, repr=False)
    key_file: str | None = None
    storage_format: str = "v2"
    nonce: str | None = field(default=None, repr=False)
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_buffered_blocks: int = 16384
    max_buffered_bytes: int = 128 * 1024 * 1024
    handshake_timeout: float = 10.0
    drain_timeout: float = 30.0
    verbose: bool = False
    log_level: str = "info"
    log_format: str = "text"
    log_file: str | None = None
    metrics_address: str | None = None

    # derived by validate()
    host: str = field(default="", init=False, repr=False)
    port: int = field(default=0, init=False, repr=False)
    metrics_host: str | None = field(default=None, init=False, repr=False)
    metrics_port: int = field(default=0, init=False, repr=False)
    master_key: bytes | None = field(default=None, init=False, repr=False)
    legacy_nonce: bytes | None = field(default=None, init=False, repr=False)
    storage: StorageConfig | None = field(default=None, init=False, repr=False)
    ephemeral_key: bool = field(default=False, init=False, repr=False)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.init]

    def validate(self) -> ServerConfig:
        """Check every value and derive host/port, keys and storage; returns self."""
        self.host, self.port = parse_listen_address(self.address)
        if self.metrics_address:
            self.metrics_host, self.metrics_port = parse_listen_address(self.metrics_address,
                                                                        "metrics-address")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log-level: must be one of {', '.join(LOG_LEVELS)}, "
                              f"got {self.log_level!r}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log-format: must be text or json, got {self.log_format!r}")
        for name in ("k", "flush_size", "block_size", "max_message_size", "max_buffered_blocks",
                     "max_buffered_bytes"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.m, int) or isinstance(self.m, bool) or self.m < 0:
            raise ConfigError(f"m: must be a whole number >= 0, got {self.m!r}")
        if self.k + self.m > 255:
            raise ConfigError(f"k + m: at most 255 storage servers, got {self.k + self.m}")
        for name in ("flush_time", "handshake_timeout", "drain_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"{name.replace('_', '-')}: must be a number of seconds > 0, "
                                  f"got {value!r}")
        if self.block_size > self.max_message_size - 1024:
            raise ConfigError(f"block-size: {self.block_size} does not fit in max-message-size "
                              f"{self.max_message_size} (leave 1024 bytes for framing)")
        if self.storage_format not in ("v2", "legacy"):
            raise ConfigError(f"storage-format: must be v2 or legacy, got {self.storage_format!r}")
        self._validate_storage()
        self._validate_keys()
        return self

    def _validate_storage(self) -> None:
        given = [s for s in self.storage_addresses if s.strip()]
        if self.memory_storage and (given or self.storage is not None):
            raise ConfigError("memory-storage: cannot be combined with storage-addresses or a "
                              "storage map in the config file")
        try:
            if given:
                parse_addresses(",".join(given), self.k + self.m)
        except StorageConfigError as exc:
            raise ConfigError(f"storage-addresses: {exc}") from None

    @property
    def effective_log_level(self) -> str:
        """``--verbose`` is short for ``--log-level debug``."""
        return "debug" if self.verbose else self.log_level

    @property
    def uses_memory_storage(self) -> bool:
        return self.memory_storage or (not self.storage_addresses and self.storage is None)

    def _validate_keys(self) -> None:
        if self.priv_key and self.key_file:
            raise ConfigError("priv-key and key-file: give only one master key")
        try:
            if self.key_file:
                self.master_key = crypto.load_key_file(self.key_file)
            elif self.priv_key:
                self.master_key = crypto.parse_key(self.priv_key, "priv-key")
        except crypto.CryptoError as exc:
            raise ConfigError(str(exc)) from None
        if self.storage_format == "legacy":
            if not self.nonce:
                raise ConfigError("nonce: the legacy storage format needs --nonce (24 hex digits)")
            try:
                self.legacy_nonce = bytes.fromhex(self.nonce)
            except ValueError:
                raise ConfigError("nonce: not hexadecimal") from None
            if len(self.legacy_nonce) != crypto.NONCE_SIZE:
                raise ConfigError(f"nonce: must be {crypto.NONCE_SIZE} bytes "
                                  f"({2 * crypto.NONCE_SIZE} hex digits)")
            if self.master_key is None or len(self.master_key) != crypto.KEY_SIZE:
                raise ConfigError("priv-key: the legacy storage format needs the 32-character "
                                  "key (--priv-key, --key-file or TLOG_PRIV_KEY)")
        elif self.nonce:
            raise ConfigError("nonce: only used with --storage-format legacy (v2 draws a fresh "
                              "nonce for every aggregation)")
        if self.master_key is None:
            if not self.uses_memory_storage:
                raise ConfigError("no master key: persistent storage needs --key-file, "
                                  "TLOG_PRIV_KEY or --priv-key (32 characters)")
            self.master_key = os.urandom(crypto.KEY_SIZE)
            self.ephemeral_key = True


def parse_listen_address(text: str, what: str = "address") -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) to a (host, port) pair; errors start with ``what``."""
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(f"{what}: expected host:port, got {text!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what}: port {port} out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ConfigError(f"{what}: missing host in {text!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not all(part.isalnum() or "-" in part for part in host.split(".")):
            raise ConfigError(f"{what}: bad host {host!r}") from None
    return host, port


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name.replace('_', '-')}: must be a whole number >= 1, got {value!r}")


def load_yaml(path: str) -> dict[str, Any]:
    """Read the YAML config file; a ConfigError names the file on any problem."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path}: not valid YAML: {exc}".splitlines()[0]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping")
    return data


def from_sources(cli_values: Mapping[str, Any], explicit: set[str]) -> ServerConfig:
    """Merge flag/env values (``explicit`` = names the user set) over the YAML file."""
    values = dict(cli_values)
    file_data: dict[str, Any] = {}
    if values.get("config"):
        file_data = load_yaml(values["config"])
    known = set(ServerConfig.option_names()) - {"config"}
    for key, value in file_data.items():
        name = str(key).replace("-", "_")
        if key in STORAGE_KEYS:
            continue
        if name not in known:
            raise ConfigError(f"config {values['config']}: unknown key {key!r}")
        if name not in explicit:
            values[name] = _coerce(name, value, values["config"])
    cfg = ServerConfig(**{k: v for k, v in values.items() if k in known | {"config"}})
    if any(key in file_data for key in STORAGE_KEYS):
        try:
            cfg.storage = parse_storage_config(file_data, cfg.k + cfg.m if _int_ok(cfg) else None)
        except StorageConfigError as exc:
            raise ConfigError(f"config {values['config']}: {exc}") from None
    return cfg.validate()


def _int_ok(cfg: ServerConfig) -> bool:
    return isinstance(cfg.k, int) and isinstance(cfg.m, int)


def _coerce(name: str, value: Any, path: str) -> Any:
    """Give a YAML value the type of its option, or say which key is wrong."""
    default = {f.name: f for f in dataclasses.fields(ServerConfig)}[name]
    kind = default.type
    if name == "storage_addresses":
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise ConfigError(f"config {path}: {name}: expected a list of host:port[@db]")
    if kind in ("int",) and not (isinstance(value, int) and not isinstance(value, bool)):
        raise ConfigError(f"config {path}: {name}: expected a whole number, got {value!r}")
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config {path}: {name}: expected a number, got {value!r}")
        return float(value)
    if kind == "bool" and not isinstance(value, bool):
        raise ConfigError(f"config {path}: {name}: expected true or false, got {value!r}")
    if kind.startswith("str") and value is not None and not isinstance(value, str | int):
        raise ConfigError(f"config {path}: {name}: expected a string, got {value!r}")
    if kind.startswith("str") and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def changed_options(old: ServerConfig, new: ServerConfig) -> list[str]:
    """Names of the options (not derived values) whose values differ, in declaration order."""
    return [name for name in ServerConfig.option_names()
            if getattr(old, name) != getattr(new, name)]


def describe_change(name: str, old: ServerConfig, new: ServerConfig) -> str:
    """``flush_size 25 -> 50`` for a log line; secrets only say that they changed."""
    if name in SECRET:
        return f"{name} (changed)"
    return f"{name} {getattr(old, name)!r} -> {getattr(new, name)!r}"


def storage_description(cfg: ServerConfig) -> str:
    if cfg.uses_memory_storage:
        return "in-memory storage"
    if cfg.storage_addresses:
        addrs = parse_addresses(",".join(cfg.storage_addresses), cfg.k + cfg.m)
        return "redis " + ",".join(str(a) for a in addrs)
    return f"storage map from {cfg.config}"


__all__ = ["ConfigError", "ServerConfig", "ServerAddress", "from_sources", "load_yaml"]
