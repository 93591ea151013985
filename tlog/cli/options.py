"""What the commands that read a vdisk's log share: the storage and key options (the
server's, also from ``TLOG_*`` variables and the YAML config), the limiter options, and
turning them into a pool, an opener and a limiter."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click

from tlog.configsource import ConfigError, describe_empty, load_config
from tlog.read.limiter import Limiter
from tlog.record import crypto
from tlog.record.aggregation import OUR_FORMATS, Keyring, RecordOpener
from tlog.record.keying import V2_VERSION, V3_VERSION
from tlog.storage import (
    ClusterPoolFactory,
    StaticPoolFactory,
    StorageConfigError,
    StoragePool,
    StoragePoolFactory,
    parse_addresses,
    parse_storage_config,
)

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

#: Exit status when the log cannot be read or is unsound (click uses 2 for usage errors).
EXIT_FAILED = 1





# ---------------------------------------------------------------------------------------------
# Options shared by the readers


def read_options(func: F) -> F:
    """The storage, key and format options of restore, inspect and verify."""
    options = [
        click.option("--vdisk", required=True, help="The vdisk whose log to read."),
        click.option("--storage-addresses", envvar="TLOG_STORAGE_ADDRESSES", default="",
                     help="Comma-separated k+m storage servers host:port[@db] or "
                          "redis[s]://[user:password@]host:port[/db][?ca=FILE], as given to "
                          "tlogserver; missing ones are filled in with sequential ports. "
                          "Passwords: in TLOG_STORAGE_ADDRESSES, the config file or "
                          "?password_file=FILE, not on the command line."),
        click.option("--config", envvar="TLOG_CONFIG",
                     metavar="FILE|etcd://HOST:PORT[,...]/PREFIX",
                     help="tlogserver's config, its YAML file or its etcd keys (a fleet's): "
                          "the storage clusters and vdisk map, and k, m, priv_key, key_file, "
                          "old_key_files, nonce, storage_format when not given as options."),
        click.option("-k", "--k", type=click.IntRange(1, 254), default=4, show_default=True,
                     envvar="TLOG_K", help="Data pieces per aggregation."),
        click.option("-m", "--m", type=click.IntRange(0, 254), default=2, show_default=True,
                     envvar="TLOG_M", help="Parity pieces per aggregation."),
        click.option("--priv-key", envvar="TLOG_PRIV_KEY", default=None,
                     help="Master key: 32 characters used as key bytes, or 64 hex digits. "
                          "For 0-Disk compatibility only: a command line is readable by "
                          "every local user (ps). Use --key-file or TLOG_PRIV_KEY."),
        click.option("--key-file", "key_file", envvar="TLOG_KEY_FILE", multiple=True,
                     type=click.Path(dir_okay=False),
                     help="File holding a master key; repeat it for the keys of a rotation "
                          "(each record names the id of its key)."),
        click.option("--old-key-file", "old_key_files", envvar="TLOG_OLD_KEY_FILE",
                     multiple=True, type=click.Path(dir_okay=False),
                     help="File holding a previous master key, as given to tlogserver "
                          "(repeatable; same as another --key-file here)."),
        click.option("--format", "record_format",
                     type=click.Choice(["auto", "v3", "v2", "legacy"]),
                     default="auto", show_default=True,
                     help="Record format: v3 or v2 (tlog's: both read either, a log may hold "
                          "both; compact and rekey write v2 records with v2, else v3), "
                          "legacy (0-Disk's, needs --nonce) or auto (tlog's records are told "
                          "apart by their header; the others are read as legacy when --nonce "
                          "is given)."),
        click.option("--nonce", envvar="TLOG_NONCE", default=None,
                     help="Legacy format: the static AES-GCM nonce, 24 hex digits."),
        click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
                     show_default=True, help="Seconds to wait for a storage server."),
        click.option("-v", "--verbose", is_flag=True, help="Log debug messages."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def limit_options(func: F) -> F:
    """The limiter options (0 = unbounded, bounds inclusive)."""
    options = [
        click.option("--start-sequence", type=click.IntRange(min=0), default=0,
                     help="First sequence to replay (0: from the start)."),
        click.option("--end-sequence", type=click.IntRange(min=0), default=0,
                     help="Last sequence to replay, inclusive (0: to the end)."),
        click.option("--start-timestamp", type=click.IntRange(min=0), default=0,
                     help="Replay blocks with a timestamp >= this (in the unit the client "
                          "wrote: nanoseconds since the epoch for 0-Disk's NBD server)."),
        click.option("--end-timestamp", type=click.IntRange(min=0), default=0,
                     help="Replay blocks with a timestamp <= this (roll back to a time)."),
        click.option("--epoch", type=click.IntRange(min=0), default=None,
                     help="The epoch the sequence bounds are of (default: the last; "
                          "tlog verify lists them): with --end-sequence the earlier epochs "
                          "are replayed whole, with --start-sequence the later ones."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@dataclass
class ReadSetup:
    """What the readers need: the vdisk's pool and how to open its records."""

    vdisk: str
    factory: StoragePoolFactory
    pool: StoragePool
    opener: RecordOpener
    #: The --config file's content (empty without one).
    config: dict[str, Any] = field(default_factory=dict)

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run a command's ``work`` on this pool to its end (`run_async`), then close the
        pool, whatever happened."""
        async def run_then_close() -> T:
            try:
                return await work
            finally:
                await self.factory.close()
        return run_async(run_then_close())


_CONFIG_KEYS: dict[str, type | tuple[type, ...]] = {
    "k": int, "m": int, "priv_key": str, "key_file": str, "nonce": str,
    "storage_addresses": (str, list), "storage_format": str, "old_key_files": (str, list),
}


def _explicit(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) in (click.core.ParameterSource.COMMANDLINE,
                                              click.core.ParameterSource.ENVIRONMENT)


def _load_config(source: str) -> dict[str, Any]:
    try:
        return load_config(source)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


def _config_key_files_here(source: str, name: str, paths: list[str]) -> None:
    """The config's key files are paths on the servers' machines: say so when one is not
    here, and how to give this machine's copy."""
    for path in paths:
        if not os.path.exists(path):
            option = "--key-file" if name == "key_file" else "--old-key-file"
            raise click.UsageError(f"config {source}: {name} {path}: no such file here (a "
                                   f"path on the servers): give this machine's copy with "
                                   f"{option}")


def read_setup(ctx: click.Context, values: dict[str, Any]) -> ReadSetup:
    """Turn the shared options (and the config file) into a pool and a record opener."""
    logging.basicConfig(level=logging.DEBUG if values["verbose"] else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)
    data: dict[str, Any] = {}
    if values["config"]:
        data = _load_config(values["config"])
        key_given = _explicit(ctx, "priv_key") or _explicit(ctx, "key_file")
        for name, kind in _CONFIG_KEYS.items():
            option = "record_format" if name == "storage_format" else name
            if name in ("priv_key", "key_file") and key_given:
                continue  # a key on the command line replaces the file's, whichever kind
            if name in data and not _explicit(ctx, option):
                value = data[name]
                if not isinstance(value, kind) or isinstance(value, bool):
                    raise click.UsageError(f"config {values['config']}: {name}: unexpected "
                                           f"value {value!r}")
                if name in ("key_file", "old_key_files"):
                    items = data[name] if isinstance(data[name], list) else [data[name]]
                    value = [str(v) for v in items]
                    _config_key_files_here(values["config"], name, value)
                values[option] = value
    k, m = values["k"], values["m"]
    if k + m > 255:
        raise click.UsageError(f"k + m: at most 255 storage servers, got {k + m}")
    addresses = values["storage_addresses"]
    if isinstance(addresses, list):
        addresses = ",".join(str(a) for a in addresses)
    timeout = values["timeout"]
    factory: StoragePoolFactory
    try:
        if addresses.strip():
            factory = StaticPoolFactory(parse_addresses(addresses, k + m), k, m,
                                        socket_timeout=timeout)
        elif data.get("storage_clusters") is not None:
            storage = parse_storage_config(data, k + m)
            factory = ClusterPoolFactory(storage, k, m, source=values["config"],
                                         socket_timeout=timeout)
        elif values["config"] and not data:
            raise click.UsageError(f"config {values['config']}: "
                                   f"{describe_empty(values['config'])}")
        else:
            raise click.UsageError("no storage given: pass --storage-addresses or a --config "
                                   "with storage_clusters")
        pool = factory.pool_for(values["vdisk"])
    except StorageConfigError as exc:
        raise click.UsageError(str(exc)) from None
    opener = _opener(values)
    return ReadSetup(values["vdisk"], factory, pool, opener, data)


def _opener(values: dict[str, Any]) -> RecordOpener:
    record_format = values["record_format"]
    if record_format not in ("auto", *OUR_FORMATS, "legacy"):
        raise click.UsageError(f"format: must be auto, v3, v2 or legacy, got {record_format!r}")
    if values["priv_key"] and values["key_file"]:
        raise click.UsageError("give only one of --priv-key and --key-file")
    try:
        keys = [crypto.load_key_file(path)
                for path in [*values["key_file"], *values.get("old_key_files", ())]]
        if values["priv_key"]:
            keys.insert(0, crypto.parse_key(values["priv_key"], "priv-key"))
        if not keys:
            raise click.UsageError("no key: the log is encrypted, pass --key-file, "
                                   "TLOG_PRIV_KEY or --priv-key")
        key = keys[0]  # the legacy format has no key ids: its key comes first
        legacy = None
        if values["nonce"]:
            if record_format in OUR_FORMATS:
                raise click.UsageError("--nonce is only used with --format legacy or auto")
            legacy = crypto.LegacyCipher.from_hex_nonce(key, values["nonce"])
        elif record_format == "legacy":
            raise click.UsageError("--format legacy needs --nonce (24 hex digits)")
    except crypto.CryptoError as exc:
        raise click.UsageError(str(exc)) from None
    return RecordOpener(Keyring.of(*keys), legacy, record_format)


def write_version(values: dict[str, Any]) -> int:
    """The version of the records a command writes (compact's checkpoints, rekey's copies):
    2 with --format v2 (or a config's ``storage_format: v2``), which keeps a log readable
    by a tlog that predates v3; else 3."""
    return V2_VERSION if values["record_format"] == "v2" else V3_VERSION


def limiter_from(values: dict[str, Any]) -> Limiter:
    try:
        if values.get("epoch") is not None and not (values["start_sequence"]
                                                    or values["end_sequence"]):
            raise click.UsageError("--epoch: qualifies --start-sequence / --end-sequence, "
                                   "give one of them")
        return Limiter(values["start_sequence"], values["end_sequence"],
                       values["start_timestamp"], values["end_timestamp"], values.get("epoch"))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run the command's coroutine (uvloop when installed: the restore is I/O bound)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(coro)
    return uvloop.run(coro)


def fail_with(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_FAILED)


def megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB"
