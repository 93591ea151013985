"""`tlog` command line: restore, inspect and verify a vdisk's log; send blocks to a server.

`restore`, `inspect` and `verify` read the storage the way tlogserver writes it, so they
take the server's storage and key options (``--storage-addresses`` or ``--config``, ``-k``,
``-m``, ``--priv-key`` or ``--key-file``, ``--nonce``), also from the same ``TLOG_*``
environment variables and from the same YAML config file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import click
import yaml

from .allocator import tune_allocator
from .read.chain import ChainReader
from .read.fetch import DecodeError
from .read.limiter import Limiter
from .read.links import ChainItem
from .read.player import (
    DEFAULT_BLOCK_SIZE,
    BlockStorage,
    FileBlockStorage,
    Player,
    PlayerError,
    PlayResult,
    RedisBlockStorage,
)
from .read.rekey import rekey_command
from .read.verify import VerifyReport, verify_chain
from .record import crypto
from .record.aggregation import Keyring, RecordOpener, describe
from .send import send_command
from .storage import (
    ClusterPoolFactory,
    ServerAddress,
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


@click.group(context_settings={"help_option_names": ["-h", "--help"],
                               "auto_envvar_prefix": "TLOG"})
def cli() -> None:
    """Tools for tlog: read back, check and replay a vdisk's transaction log."""


cli.add_command(send_command, "send")
cli.add_command(rekey_command, "rekey")


# ---------------------------------------------------------------------------------------------
# Options shared by the readers


def _read_options(func: F) -> F:
    """The storage, key and format options of restore, inspect and verify."""
    options = [
        click.option("--vdisk", required=True, help="The vdisk whose log to read."),
        click.option("--storage-addresses", envvar="TLOG_STORAGE_ADDRESSES", default="",
                     help="Comma-separated k+m storage servers host:port[@db] or "
                          "redis[s]://[user:password@]host:port[/db][?ca=FILE], as given to "
                          "tlogserver; missing ones are filled in with sequential ports. "
                          "Passwords: in TLOG_STORAGE_ADDRESSES, the config file or "
                          "?password_file=FILE, not on the command line."),
        click.option("--config", type=click.Path(dir_okay=False, exists=True),
                     envvar="TLOG_CONFIG",
                     help="tlogserver's YAML config: its storage clusters and vdisk map, and "
                          "k, m, priv_key, key_file, old_key_files, nonce, storage_format "
                          "when not given as options."),
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
        click.option("--format", "record_format", type=click.Choice(["auto", "v2", "legacy"]),
                     default="auto", show_default=True,
                     help="Record format: v2 (tlog's), legacy (0-Disk's, needs --nonce) or "
                          "auto (v2 records are told apart by their header; the others are "
                          "read as legacy when --nonce is given)."),
        click.option("--nonce", envvar="TLOG_NONCE", default=None,
                     help="Legacy format: the static AES-GCM nonce, 24 hex digits."),
        click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
                     show_default=True, help="Seconds to wait for a storage server."),
        click.option("-v", "--verbose", is_flag=True, help="Log debug messages."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _limit_options(func: F) -> F:
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


_CONFIG_KEYS: dict[str, type | tuple[type, ...]] = {
    "k": int, "m": int, "priv_key": str, "key_file": str, "nonce": str,
    "storage_addresses": (str, list), "storage_format": str, "old_key_files": (str, list),
}


def _explicit(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) in (click.core.ParameterSource.COMMANDLINE,
                                              click.core.ParameterSource.ENVIRONMENT)


def _load_config(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as stream:
            data = yaml.safe_load(stream)
    except OSError as exc:
        raise click.UsageError(f"config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise click.UsageError(f"config {path}: not valid YAML: {exc}".splitlines()[0]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise click.UsageError(f"config {path}: the top level must be a mapping")
    return data


def _setup(ctx: click.Context, values: dict[str, Any]) -> ReadSetup:
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
        else:
            raise click.UsageError("no storage given: pass --storage-addresses or a --config "
                                   "with storage_clusters")
        pool = factory.pool_for(values["vdisk"])
    except StorageConfigError as exc:
        raise click.UsageError(str(exc)) from None
    opener = _opener(values)
    return ReadSetup(values["vdisk"], factory, pool, opener)


def _opener(values: dict[str, Any]) -> RecordOpener:
    record_format = values["record_format"]
    if record_format not in ("auto", "v2", "legacy"):
        raise click.UsageError(f"format: must be auto, v2 or legacy, got {record_format!r}")
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
            if record_format == "v2":
                raise click.UsageError("--nonce is only used with --format legacy or auto")
            legacy = crypto.LegacyCipher.from_hex_nonce(key, values["nonce"])
        elif record_format == "legacy":
            raise click.UsageError("--format legacy needs --nonce (24 hex digits)")
    except crypto.CryptoError as exc:
        raise click.UsageError(str(exc)) from None
    return RecordOpener(Keyring.of(*keys), legacy, record_format)


def _limiter(values: dict[str, Any]) -> Limiter:
    try:
        if values.get("epoch") is not None and not (values["start_sequence"]
                                                    or values["end_sequence"]):
            raise click.UsageError("--epoch: qualifies --start-sequence / --end-sequence, "
                                   "give one of them")
        return Limiter(values["start_sequence"], values["end_sequence"],
                       values["start_timestamp"], values["end_timestamp"], values.get("epoch"))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run the command's coroutine (uvloop when installed: the restore is I/O bound)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(coro)
    return uvloop.run(coro)


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_FAILED)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


# ---------------------------------------------------------------------------------------------
# restore


class _Progress:
    """A progress bar on stderr (blocks, MB/s, ETA) when it is a terminal, else nothing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self._walked = 0

    def walked(self, count: int) -> None:
        if self.enabled and count % 256 == 0:
            click.echo(f"\rreading the chain back: {count} aggregations", err=True, nl=False)
            self._walked = count

    def start(self, total_blocks: int) -> None:
        if not self.enabled:
            return
        if self._walked:
            click.echo("", err=True)

        def show(result: PlayResult | None) -> str:
            return "" if result is None else f"{result.mb_per_s:.0f} MB/s"

        self.bar = click.progressbar(length=max(total_blocks, 1), label="restoring blocks",
                                     file=sys.stderr, show_eta=True, show_pos=True,
                                     item_show_func=show)
        self.bar.__enter__()

    def item(self, item: ChainItem, result: PlayResult) -> None:
        if self.bar is not None:
            self.bar.update(len(item.aggregation.blocks), result)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _summary(vdisk: str, result: PlayResult, target: str, reader: ChainReader) -> str:
    parts = [f"restored vdisk {vdisk} into {target}: {result.blocks} blocks "
             f"({result.sets} set, {result.deletes} deleted) from {result.aggregations} "
             "aggregations"]
    if result.epochs > 1:
        parts.append(f"{result.epochs} epochs, the last ({result.epoch}) with sequences "
                     f"{result.first_sequence}..{result.last_sequence}")
    elif result.last_sequence is not None:
        parts.append(f"sequences {result.first_sequence}..{result.last_sequence}")
    parts.append(f"{_mb(result.data_bytes)} in {result.seconds:.2f} s "
                 f"({result.mb_per_s:.1f} MB/s)")
    if result.duplicates:
        parts.append(f"{result.duplicates} duplicate blocks skipped")
    if result.rebuilt:
        parts.append(f"{result.rebuilt} aggregations rebuilt from parity")
    if reader.down_servers:
        addresses = [reader.pool.servers[i].address for i in reader.down_servers]
        parts.append("unreachable: " + ", ".join(addresses))
    return "; ".join(parts)


@cli.command("restore")
@_read_options
@_limit_options
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="Raw disk image to write (created; emptied first unless --keep-existing).")
@click.option("--output-redis", default=None, metavar="HOST:PORT[@DB]",
              help="Write the blocks into a Redis block store instead: one key per block.")
@click.option("--redis-key-prefix", default=None,
              help="Key prefix of the Redis block store (default '<vdisk>:'); block i is "
                   "'<prefix><i>'.")
@click.option("--block-size", type=click.IntRange(min=1), default=DEFAULT_BLOCK_SIZE,
              show_default=True, help="Block size of the vdisk, in bytes.")
@click.option("--keep-existing", is_flag=True,
              help="Apply onto the image's current content instead of starting empty (to "
                   "replay a later range onto an earlier restore).")
@click.option("--size", type=click.IntRange(min=0), default=0,
              help="Make the image at least this many bytes (the vdisk size).")
@click.option("--sync", is_flag=True, help="fsync the image before exiting.")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar (default: when stderr is a terminal).")
@click.pass_context
def restore_command(ctx: click.Context, **values: Any) -> None:
    """Replay a vdisk's log into a disk image (or a Redis block store).

    Replays to the last sequence, or up to --end-sequence / --end-timestamp to roll back.
    Every record is checked (hash, AES-GCM tag, prev link, block hashes); up to m missing or
    corrupt pieces are rebuilt from parity. Prints a one-line summary.
    """
    if (values["output"] is None) == (values["output_redis"] is None):
        raise click.UsageError("give exactly one of --output and --output-redis")
    # A restore churns through ~100 KB records and their pieces: keep glibc from handing
    # that memory back to the kernel and faulting it in again for every record.
    tune_allocator()
    setup = _setup(ctx, values)
    limiter = _limiter(values)
    storage: BlockStorage
    try:
        if values["output"] is not None:
            storage = FileBlockStorage(values["output"], values["block_size"],
                                       truncate=not values["keep_existing"], size=values["size"],
                                       sync=values["sync"])
        else:
            prefix = values["redis_key_prefix"]
            storage = RedisBlockStorage(ServerAddress.parse(values["output_redis"]),
                                        f"{setup.vdisk}:" if prefix is None else prefix,
                                        values["block_size"], timeout=values["timeout"])
    except (StorageConfigError, PlayerError) as exc:
        raise click.UsageError(str(exc)) from None
    show = values["progress"] if values["progress"] is not None else sys.stderr.isatty()
    progress = _Progress(show)

    async def run() -> tuple[PlayResult, ChainReader]:
        reader = ChainReader(setup.pool, setup.vdisk, setup.opener, limiter,
                             on_walk=progress.walked, timeout=values["timeout"])
        started = time.perf_counter()
        try:
            links = await reader.walk()
            if not links:
                raise DecodeError(f"vdisk {setup.vdisk}: no aggregations stored")
            progress.start(reader.total_blocks)
            player = Player(storage, on_item=progress.item)
            try:
                result = await player.play(reader)
            finally:
                progress.finish()
            result.seconds = time.perf_counter() - started  # the walk back included
            return result, reader
        finally:
            await storage.close()
            await setup.factory.close()

    try:
        result, reader = _run(run())
    except (DecodeError, PlayerError) as exc:
        _fail(str(exc))
        return
    click.echo(_summary(setup.vdisk, result, storage.describe(), reader))


# ---------------------------------------------------------------------------------------------
# inspect


def _line(info: dict[str, Any]) -> str:
    return (f"{info['hash']} seq {info['first_sequence']}..{info['last_sequence']} "
            f"blocks {info['blocks']} time {info['timestamp']} "
            f"block-times {info['first_block_timestamp']}..{info['last_block_timestamp']} "
            f"data {info['data_bytes']} record {info['record_bytes']} "
            f"compressed {info['compressed_bytes']} {info['format']}")


@cli.command("inspect")
@_read_options
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per line (hash, prev, first_sequence, last_sequence, "
                   "blocks, timestamps, sizes, format, key_id).")
@click.pass_context
def inspect_command(ctx: click.Context, **values: Any) -> None:
    """List a vdisk's aggregations, oldest first, one per line.

    Each line: hash, sequence range, number of blocks, the aggregation's timestamp and its
    blocks' timestamps, data / record / compressed sizes in bytes, record format. Every
    aggregation listed has been checked like a restore checks it.
    """
    setup = _setup(ctx, values)
    as_json = values["as_json"]

    async def run() -> int:
        reader = ChainReader(setup.pool, setup.vdisk, setup.opener)
        count = 0
        try:
            async for item in reader.items():
                info = dict(describe(item.aggregation))
                click.echo(json.dumps(info, sort_keys=False) if as_json else _line(info))
                count += 1
        finally:
            await setup.factory.close()
        return count

    try:
        count = _run(run())
    except DecodeError as exc:
        _fail(str(exc))
        return
    if count == 0:
        click.echo(f"vdisk {setup.vdisk}: no aggregations stored", err=True)


# ---------------------------------------------------------------------------------------------
# verify


@cli.command("verify")
@_read_options
@click.option("--allow-gaps", is_flag=True,
              help="Do not count missing sequences between aggregations as an error.")
@click.pass_context
def verify_command(ctx: click.Context, **values: Any) -> None:
    """Check a vdisk's whole chain: every piece, record hash, AES-GCM tag, prev link and
    block hash, and that the sequences have no gaps.

    Exit status 0 when the chain is sound (pieces rebuilt from parity are reported as
    warnings), 1 otherwise, naming the first bad aggregation.
    """
    setup = _setup(ctx, values)

    async def run() -> VerifyReport:
        try:
            return await verify_chain(setup.pool, setup.vdisk, setup.opener,
                                      allow_gaps=values["allow_gaps"])
        finally:
            await setup.factory.close()

    report = _run(run())
    for problem in report.problems:
        click.echo(str(problem), err=True)
    if report.errors:
        first = report.errors[0]
        name = first.key.hex() if first.key is not None else "(none)"
        click.echo(f"vdisk {setup.vdisk}: chain NOT sound; first bad aggregation {name}: "
                   f"{first.message}")
        sys.exit(EXIT_FAILED)
    if report.aggregations == 0:
        click.echo(f"vdisk {setup.vdisk}: no aggregations stored")
        sys.exit(EXIT_FAILED)
    warnings = f", {len(report.warnings)} warnings" if report.warnings else ""
    epochs = ""
    if len(report.epochs) > 1 or (report.epochs and report.epochs[0][0]):
        epochs = f" (of epoch {report.epochs[-1][0]}; {len(report.epochs)} epochs)"
        for number, key, start in report.epochs:
            click.echo(f"epoch {number}: from aggregation {key.hex()} (sequence {start})",
                       err=True)
    copies = f", {report.copies} re-flushed copies" if report.copies else ""
    click.echo(f"vdisk {setup.vdisk}: chain sound: {report.aggregations} aggregations, "
               f"{report.blocks} blocks{copies}, sequences {report.first_sequence}.."
               f"{report.last_sequence}{epochs}{warnings}")


from .repair_cli import repair_command  # noqa: E402  (it uses the option helpers above)

cli.add_command(repair_command, "repair")


def main() -> None:
    cli(prog_name="tlog")

