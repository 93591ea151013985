"""The server's configuration: one typed object, validated once.

Values come from, in order of precedence: command-line flags, ``TLOG_*``
environment variables (click folds both in), the YAML file given with
``--config``, and the defaults below. `ServerConfig.validate` checks everything
and raises `ConfigError` with a one-line message naming the bad setting.

A config is built whole and then left alone: a reload builds the next one
(`ServerConfig.reloaded`), validates it, and the server swaps it in.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import ssl
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from tlog.configsource import ConfigError, describe_empty, load_yaml_file
from tlog.nbd.hostconfig import NBD_SERVERS, check_nbd_servers
from tlog.protocol import DEFAULT_MAX_MESSAGE_SIZE
from tlog.read.standby import StandbyTarget, parse_slave_targets
from tlog.record import crypto
from tlog.retention import RetentionPolicy, parse_vdisk_retention, server_policy
from tlog.storage import (
    ServerAddress,
    StorageConfig,
    StorageConfigError,
    parse_addresses,
    parse_storage_config,
)

from .access import AccessConfigError, AccessPolicy, parse_modes, parse_policy

log = logging.getLogger(__name__)

#: YAML keys that are not server options but the storage map (see tlog.storage); the
#: ``vdisks`` entries also hold the vdisks' access settings (tlogserver.access).
STORAGE_KEYS = ("storage_clusters", "vdisks", "default_storage_cluster")
#: YAML keys that are not server options but access settings (tlogserver.access).
ACCESS_KEYS = ("tls_clients",)
#: YAML keys of the NBD servers (`tlog.nbd.hostconfig`): checked, not a server option.
NBD_KEYS = (NBD_SERVERS,)
LOG_LEVELS = ("debug", "info", "warning", "error")
#: Options a SIGHUP applies to the running server; the others need a restart.
RELOADABLE = frozenset({"flush_size", "flush_time", "max_buffered_blocks", "max_buffered_bytes",
                        "max_pending_bytes", "max_server_buffered_bytes", "max_connections",
                        "stalled_writer_timeout", "ack_delay",
                        "handshake_timeout", "drain_timeout", "verbose", "log_level",
                        "log_format", "access", "old_key_files", "tls_cert", "tls_key",
                        "retention_keep_since", "retention_keep_sequences",
                        "retention_keep_bytes", "retention_interval"})
#: Settings a stored log is written and read with: they cannot change once a log exists
#: (`tlog config` refuses to change them in a fleet's keys; a server only reports them).
LOG_LAYOUT = ("k", "m", "block_size", "storage_format", "nonce")
#: Storage formats of ours: a log goes on from one to the other (an upgrade to v3, a
#: rollback to v2), since readers read both; a change between them is no layout change.
OUR_STORAGE_FORMATS = ("v3", "v2")


def layout_moves(name: str, old: object, new: object) -> bool:
    """Whether changing the `LOG_LAYOUT` setting ``name`` from ``old`` to ``new`` changes
    what a live log is written with beyond what its readers follow."""
    if name == "storage_format" and old in OUR_STORAGE_FORMATS and new in OUR_STORAGE_FORMATS:
        return False
    return old != new
#: Options whose values are never logged, not even when they change (storage addresses may
#: hold passwords: they are logged without them).
SECRET = frozenset({"priv_key", "nonce"})
#: Field metadata of what a config is built from besides its options (the config source's
#: structure): not an option, no flag.
_SOURCE = {"option": False}


@dataclass
class ServerConfig:
    address: str = "0.0.0.0:11211"
    storage_addresses: list[str] = field(default_factory=list, repr=False)
    memory_storage: bool = False
    config: str | None = None
    k: int = 4
    m: int = 2
    flush_size: int = 25
    flush_time: float = 25.0
    block_size: int = 4096
    priv_key: str | None = field(default=None, repr=False)
    key_file: str | None = None
    old_key_files: list[str] = field(default_factory=list)
    #: v3 (ours, BLAKE3 keys), v2 (ours, BLAKE2b keys: readable by a tlog without v3) or
    #: legacy (0-Disk's)
    storage_format: str = "v3"
    nonce: str | None = field(default=None, repr=False)
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_buffered_blocks: int = 16384
    max_buffered_bytes: int = 128 * 1024 * 1024
    #: per vdisk: bytes received in order and not stored yet (storage behind or down)
    max_pending_bytes: int = 256 * 1024 * 1024
    #: every vdisk together: out-of-order and not-yet-stored bytes
    max_server_buffered_bytes: int = 1024 * 1024 * 1024
    #: client connections open at once; 0 = no limit
    max_connections: int = 4096
    #: seconds a client may leave its answers unread (our send buffer full) before it is cut
    stalled_writer_timeout: float = 30.0
    #: seconds the answers (RecvOK...) to a read of few blocks may wait to be written with
    #: the next ones; 0: every read is answered at once
    ack_delay: float = 0.001
    handshake_timeout: float = 10.0
    drain_timeout: float = 30.0
    verbose: bool = False
    log_level: str = "info"
    log_format: str = "text"
    log_file: str | None = None
    metrics_address: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    plain_address: str | None = None
    access: str = "plain"
    min_pieces: int | None = None
    #: replay stored aggregations into the standby of each vdisk whose entry has slave_sync
    with_slave_sync: bool = False
    #: seconds a WaitNbdSlaveSync may wait for the standby before it fails
    slave_sync_timeout: float = 30.0
    #: per vdisk: bytes of stored blocks queued for the standby; beyond, it reads the log
    slave_sync_queue_bytes: int = 64 * 1024 * 1024
    #: with an etcd config: this server's name in the vdisk ownership keys (default
    #: hostname:port) and the seconds its lease outlives it
    server_id: str | None = None
    owner_lease_ttl: int = 10
    #: the retention policy of every vdisk served whose entry has no ``retention`` of its
    #: own (docs/retention.md): history kept by time, sequences, stored bytes; how often
    retention_keep_since: str | None = None
    retention_keep_sequences: int | None = None
    retention_keep_bytes: str | None = None
    retention_interval: str = "10m"

    # from the config source's structure (from_sources), not options
    storage: StorageConfig | None = field(default=None, repr=False, metadata=_SOURCE)
    vdisk_access: dict[str, Any] = field(default_factory=dict, repr=False, metadata=_SOURCE)
    tls_clients: dict[str, Any] = field(default_factory=dict, repr=False, metadata=_SOURCE)
    # derived by validate()
    host: str = field(default="", init=False, repr=False)
    port: int = field(default=0, init=False, repr=False)
    metrics_host: str | None = field(default=None, init=False, repr=False)
    metrics_port: int = field(default=0, init=False, repr=False)
    master_key: bytes | None = field(default=None, init=False, repr=False)
    legacy_nonce: bytes | None = field(default=None, init=False, repr=False)
    ephemeral_key: bool = field(default=False, init=False, repr=False)
    old_keys: list[bytes] = field(default_factory=list, init=False, repr=False)
    access_policy: AccessPolicy = field(default_factory=AccessPolicy, init=False, repr=False)
    plain_host: str | None = field(default=None, init=False, repr=False)
    plain_port: int = field(default=0, init=False, repr=False)
    #: vdisk -> its standby, from the ``vdisks`` entries (empty without --with-slave-sync)
    slave_targets: dict[str, StandbyTarget] = field(default_factory=dict, init=False,
                                                    repr=False)
    #: the --retention-* policy, and the vdisks' own (None: retention off for the vdisk)
    retention_default: RetentionPolicy | None = field(default=None, init=False, repr=False)
    retention_vdisks: dict[str, RetentionPolicy | None] = field(default_factory=dict,
                                                                init=False, repr=False)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)
                if f.init and f.metadata.get("option", True)]

    def reloaded(self, new: ServerConfig, live: Collection[str],
                 storage: bool) -> ServerConfig:
        """The config a reload runs on, built whole and validated (self is not touched):
        this config's options but the ``live`` ones, which are ``new``'s; new's vdisk
        entries and certificate names (access rules, retention); new's storage map when
        ``storage``, else this one's. What only a restart changes keeps its running value
        (see `validate`). ConfigError when the mix does not hold together."""
        options = {name: getattr(new if name in live else self, name)
                   for name in self.option_names()}
        merged = ServerConfig(**options, storage=new.storage if storage else self.storage,
                              vdisk_access=new.vdisk_access, tls_clients=new.tls_clients)
        return merged.validate(running=self)

    def validate(self, running: ServerConfig | None = None) -> ServerConfig:
        """Check every value and derive host/port, keys and storage; returns self.

        ``running``: the config of the running server this one replaces (a reload), whose
        master key (the key file may have changed since, or the key was drawn at random)
        and standbys are kept: they change only with a restart.
        """
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
                     "max_buffered_bytes", "max_pending_bytes", "max_server_buffered_bytes",
                     "slave_sync_queue_bytes", "owner_lease_ttl"):
            _positive_int(name, getattr(self, name))
        if (isinstance(self.max_connections, bool) or not isinstance(self.max_connections, int)
                or self.max_connections < 0):
            raise ConfigError(f"max-connections: must be a whole number >= 0 (0: no limit), "
                              f"got {self.max_connections!r}")
        if not isinstance(self.m, int) or isinstance(self.m, bool) or self.m < 0:
            raise ConfigError(f"m: must be a whole number >= 0, got {self.m!r}")
        if self.k + self.m > 255:
            raise ConfigError(f"k + m: at most 255 storage servers, got {self.k + self.m}")
        if (isinstance(self.ack_delay, bool) or not isinstance(self.ack_delay, int | float)
                or not 0 <= self.ack_delay <= 1):
            raise ConfigError(f"ack-delay: must be a number of seconds from 0 to 1, got "
                              f"{self.ack_delay!r}")
        for name in ("flush_time", "handshake_timeout", "drain_timeout",
                     "stalled_writer_timeout", "slave_sync_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"{name.replace('_', '-')}: must be a number of seconds > 0, "
                                  f"got {value!r}")
        if self.block_size > self.max_message_size - 1024:
            raise ConfigError(f"block-size: {self.block_size} does not fit in max-message-size "
                              f"{self.max_message_size} (leave 1024 bytes for framing)")
        if self.storage_format not in ("v3", "v2", "legacy"):
            raise ConfigError("storage-format: must be v3, v2 or legacy, got "
                              f"{self.storage_format!r}")
        self._validate_storage()
        self._validate_keys(running)
        self._validate_min_pieces()
        self._validate_tls()
        self._validate_access()
        self._validate_slaves(running)
        self._validate_retention()
        return self

    def _validate_retention(self) -> None:
        if self.retention_keep_sequences is not None and (
                isinstance(self.retention_keep_sequences, bool)
                or not isinstance(self.retention_keep_sequences, int)
                or self.retention_keep_sequences < 1):
            raise ConfigError("retention-keep-sequences: must be a whole number >= 1, got "
                              f"{self.retention_keep_sequences!r}")
        try:
            self.retention_default = server_policy(
                self.retention_keep_since, self.retention_keep_sequences,
                self.retention_keep_bytes, self.retention_interval)
        except ValueError as exc:
            raise ConfigError(f"retention: {str(exc).removeprefix('retention: ')}") from None
        try:
            self.retention_vdisks = parse_vdisk_retention(self.vdisk_access)
        except ValueError as exc:
            where = f"config {self.config}: " if self.config else ""
            raise ConfigError(f"{where}{exc}") from None
        if (self.retention_default is not None or any(self.retention_vdisks.values())) and (
                self.storage_format == "legacy"):
            raise ConfigError("retention: the legacy storage format cannot hold checkpoints "
                              "(0-Disk's tools could not read the log); use v3 or v2")

    def retention_for(self, vdisk_id: str) -> RetentionPolicy | None:
        """The retention policy of ``vdisk_id``: its entry's, else the server's; None: its
        log is not compacted by this server."""
        if vdisk_id in self.retention_vdisks:
            return self.retention_vdisks[vdisk_id]
        return self.retention_default

    def _validate_slaves(self, running: ServerConfig | None) -> None:
        if running is not None:
            self.slave_targets = running.slave_targets
            return
        try:
            targets = parse_slave_targets(self.vdisk_access)
        except StorageConfigError as exc:
            where = f"config {self.config}: " if self.config else ""
            raise ConfigError(f"{where}{exc}") from None
        if self.with_slave_sync and self.storage is not None:
            for vdisk_id in targets:
                if self.storage.cluster_for(vdisk_id) is None:
                    raise ConfigError(f"vdisks.{vdisk_id}: slave_sync needs the vdisk's "
                                      "storage_cluster (or a default_storage_cluster)")
        self.slave_targets = targets if self.with_slave_sync else {}

    def _validate_min_pieces(self) -> None:
        if self.min_pieces is None:
            # One piece more than a read needs, unless there is no parity to spare.
            self.min_pieces = min(self.k + 1, self.k + self.m)
        value = self.min_pieces
        if (isinstance(value, bool) or not isinstance(value, int)
                or not self.k <= value <= self.k + self.m):
            raise ConfigError(f"min-pieces: must be a whole number from k ({self.k}) to k+m "
                              f"({self.k + self.m}), got {value!r}")

    @property
    def tls(self) -> bool:
        """Whether the main listener speaks TLS."""
        return bool(self.tls_cert)

    def _validate_tls(self) -> None:
        if not self.tls_cert:
            for name in ("tls_key", "tls_client_ca", "plain_address"):
                if getattr(self, name):
                    raise ConfigError(f"{name.replace('_', '-')}: needs tls-cert (the "
                                      "listener's certificate)")
            return
        server_tls_context(self)  # the files exist, parse, and the key fits the certificate
        if self.plain_address:
            self.plain_host, self.plain_port = parse_listen_address(self.plain_address,
                                                                    "plain-address")
            if (self.plain_host, self.plain_port) == (self.host, self.port) and self.port:
                raise ConfigError("plain-address: must differ from address")

    def _validate_access(self) -> None:
        try:
            parse_modes(self.access, "access")
            policy = parse_policy(self.access, self.vdisk_access, self.tls_clients)
        except AccessConfigError as exc:
            where = f"config {self.config}: " if self.config else ""
            raise ConfigError(f"{where}{exc}") from None
        if not self.tls_client_ca:
            if "mtls" in policy.modes_used:
                raise ConfigError("access: mtls needs tls-client-ca (the CA that signs the "
                                  "client certificates)")
            if policy.tls_clients:
                raise ConfigError("tls_clients: needs tls-client-ca")
        self.access_policy = policy

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

    def _validate_keys(self, running: ServerConfig | None) -> None:
        if self.priv_key and self.key_file:
            raise ConfigError("priv-key and key-file: give only one master key")
        if running is not None:
            self.master_key, self.ephemeral_key = running.master_key, running.ephemeral_key
        else:
            try:
                if self.key_file:
                    self.master_key = crypto.load_key_file(self.key_file)
                elif self.priv_key:
                    self.master_key = crypto.parse_key(self.priv_key, "priv-key")
            except crypto.CryptoError as exc:
                raise ConfigError(str(exc)) from None
        if self.old_key_files and self.storage_format == "legacy":
            raise ConfigError("old-key-file: only for the v3 and v2 storage formats (legacy "
                              "records carry no key id)")
        old: list[bytes] = []
        for path in self.old_key_files:
            try:
                old.append(crypto.load_key_file(path))
            except crypto.CryptoError as exc:
                raise ConfigError(f"old-key-file: {exc}") from None
        self.old_keys = old
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
            raise ConfigError("nonce: only used with --storage-format legacy (v3 and v2 draw a "
                              "fresh nonce for every aggregation)")
        if self.master_key is None and old:
            raise ConfigError("old-key-file: the current key (key-file) is missing: old keys "
                              "only read, new aggregations are written with the current one")
        if self.master_key is None:
            if not self.uses_memory_storage:
                raise ConfigError("no master key: persistent storage needs --key-file, "
                                  "TLOG_PRIV_KEY or --priv-key (32 characters)")
            self.master_key = os.urandom(crypto.KEY_SIZE)
            self.ephemeral_key = True


def server_tls_context(cfg: ServerConfig) -> ssl.SSLContext:
    """The listener's TLS context: its certificate, TLS 1.2 or later, and, with
    ``tls_client_ca``, client certificates verified when presented (a connection without
    one is not refused by TLS: the vdisk's access rule decides)."""
    assert cfg.tls_cert
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cfg.tls_cert, cfg.tls_key or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls-cert / tls-key: cannot load {cfg.tls_cert}"
                          f"{' / ' + cfg.tls_key if cfg.tls_key else ''}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    if cfg.tls_client_ca:
        try:
            context.load_verify_locations(cafile=cfg.tls_client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tls-client-ca: cannot load {cfg.tls_client_ca}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


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


def from_sources(cli_values: Mapping[str, Any], explicit: set[str],
                 file_data: dict[str, Any] | None = None) -> ServerConfig:
    """Merge flag/env values (``explicit`` = names the user set) over the YAML file, or
    over ``file_data`` (the same content read from etcd, `tlogserver.etcdsource`)."""
    values = dict(cli_values)
    if file_data is None:
        file_data = load_yaml_file(values["config"]) if values.get("config") else {}
    known = set(ServerConfig.option_names()) - {"config"}
    for name, value in file_options(file_data, values["config"]).items():
        if name not in explicit:
            values[name] = value
    options = {k: v for k, v in values.items() if k in known | {"config"}}
    storage = None
    if _has_storage_map(file_data):
        try:
            storage = parse_storage_config(file_data, _servers(options))
        except StorageConfigError as exc:
            raise ConfigError(f"config {values['config']}: {exc}") from None
    vdisks = file_data.get("vdisks")
    clients = file_data.get("tls_clients")
    if clients is not None and not isinstance(clients, dict):
        raise ConfigError(f"config {values['config']}: tls_clients: expected a mapping of "
                          "certificate name -> vdisk patterns")
    return ServerConfig(**options, storage=storage,
                        vdisk_access=dict(vdisks) if isinstance(vdisks, dict) else {},
                        tls_clients=dict(clients or {})).validate()


def require_storage(cfg: ServerConfig, data: Mapping[str, Any]) -> None:
    """A server given a config source (``data`` is what it holds) stores where that source,
    or a flag, says: never on the in-memory storage by default, which is for a server
    started with no config at all (or with --memory-storage). ConfigError says why."""
    if not cfg.config or cfg.memory_storage or cfg.storage_addresses or cfg.storage is not None:
        return
    why = describe_empty(cfg.config) if not data else "it defines no storage"
    raise ConfigError(f"config {cfg.config}: {why}: no storage_clusters (with vdisks or a "
                      "default_storage_cluster) and no storage_addresses; give "
                      "--storage-addresses, or --memory-storage for a server whose data does "
                      "not survive it")


def file_options(data: Mapping[str, Any], source: str | None) -> dict[str, Any]:
    """The server options of a config's content, typed; ConfigError for an unknown key or
    a wrong type (the storage map and access keys are left to their parsers)."""
    known = set(ServerConfig.option_names()) - {"config"}
    options: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if key in STORAGE_KEYS or key in ACCESS_KEYS or key in NBD_KEYS:
            continue
        if name not in known:
            raise ConfigError(f"config {source}: unknown key {key!r}")
        options[name] = _coerce(name, value, str(source))
    return options


def check_file_data(data: Mapping[str, Any], source: str) -> None:
    """Check a config's content (a YAML file's, or what etcd holds) without starting a
    server: option names and types, the storage map, access rules, slave sync entries.
    What needs the server's machine (key and certificate files) is checked at its start.
    Raises ConfigError naming the key."""
    defaults = ServerConfig()
    values = {name: getattr(defaults, name) for name in ServerConfig.option_names()}
    values.update(file_options(data, source))
    k, m = values["k"], values["m"]
    try:
        check_nbd_servers(data)
    except ConfigError as exc:
        raise ConfigError(f"config {source}: {exc}") from None
    try:
        if _has_storage_map(data):
            parse_storage_config(data, k + m)
        parse_slave_targets(data.get("vdisks"))
        parse_policy(values["access"], data.get("vdisks"), data.get("tls_clients"))
        vdisks = data.get("vdisks")
        parse_vdisk_retention(vdisks if isinstance(vdisks, dict) else None)
        server_policy(values["retention_keep_since"], values["retention_keep_sequences"],
                      values["retention_keep_bytes"], values["retention_interval"])
    except (StorageConfigError, AccessConfigError, ValueError) as exc:
        raise ConfigError(f"config {source}: {exc}") from None


def _has_storage_map(file_data: Mapping[str, Any]) -> bool:
    """Whether the file maps vdisks to storage clusters (its ``vdisks`` entries may hold
    only access settings, for a server on --storage-addresses)."""
    if "storage_clusters" in file_data or "default_storage_cluster" in file_data:
        return True
    vdisks = file_data.get("vdisks")
    if not isinstance(vdisks, Mapping):
        return vdisks is not None
    return any(not isinstance(entry, Mapping) or "storage_cluster" in entry
               for entry in vdisks.values() if entry is not None)


def _servers(options: Mapping[str, Any]) -> int | None:
    """k + m of the options (the defaults where not given); None if either is no number
    (validation says so)."""
    k, m = options.get("k", ServerConfig.k), options.get("m", ServerConfig.m)
    return k + m if isinstance(k, int) and isinstance(m, int) else None


def _coerce(name: str, value: Any, path: str) -> Any:
    """Give a YAML value the type of its option, or say which key is wrong."""
    default = {f.name: f for f in dataclasses.fields(ServerConfig)}[name]
    kind = default.type
    if name in ("storage_addresses", "old_key_files"):
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        what = "host:port[@db]" if name == "storage_addresses" else "key file paths"
        raise ConfigError(f"config {path}: {name}: expected a list of {what}")
    if name == "access":
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return ",".join(value)
        if not isinstance(value, str):
            raise ConfigError(f"config {path}: access: expected plain, token, mtls or a list")
        return value
    if name in ("retention_keep_since", "retention_keep_bytes", "retention_interval"):
        # "7d", "10GiB", or a plain number of seconds / bytes
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, str | int | float)):
            raise ConfigError(f"config {path}: {name}: expected a duration or size, got "
                              f"{value!r}")
        return None if value is None else str(value)
    if name in ("min_pieces", "retention_keep_sequences"):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"config {path}: {name}: expected a whole number, got {value!r}")
        return value
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
    if name == "storage_addresses":
        return f"{name} {_redacted(old.storage_addresses)} -> {_redacted(new.storage_addresses)}"
    return f"{name} {getattr(old, name)!r} -> {getattr(new, name)!r}"


def _redacted(addresses: list[str]) -> str:
    """Storage addresses as the logs may show them: without passwords."""
    shown = []
    for item in addresses:
        try:
            shown.append(str(ServerAddress.parse(item)))
        except StorageConfigError:
            shown.append("(invalid)")
    return repr(shown)


def storage_description(cfg: ServerConfig) -> str:
    if cfg.uses_memory_storage:
        return "in-memory storage"
    if cfg.storage_addresses:
        addrs = parse_addresses(",".join(cfg.storage_addresses), cfg.k + cfg.m)
        return "redis " + ",".join(str(a) for a in addrs)
    return f"storage map from {cfg.config}"


__all__ = ["ConfigError", "ServerConfig", "ServerAddress", "from_sources"]
