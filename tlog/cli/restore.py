"""`tlog restore`: replay a vdisk's log into an image file or a Redis block store."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any

import click
import redis

from tlog.allocator import tune_allocator
from tlog.nbd.backend import default_state_path
from tlog.nbd.intent import FileIntentLog, IntentError, IntentLog, RedisIntentLog, record_agreement
from tlog.read.chain import ChainReader
from tlog.read.head import NoLog
from tlog.read.limiter import Limiter
from tlog.read.links import ChainItem
from tlog.read.player import (
    DEFAULT_BLOCK_SIZE,
    BlockStorage,
    FileBlockStorage,
    Player,
    PlayerError,
    PlayResult,
    RedisBlockStorage,
)
from tlog.record.pieces import DecodeError
from tlog.retention import PinError, read_pins
from tlog.storage import (
    ServerAddress,
    StorageConfigError,
)
from tlog.storage.blockstore import default_prefix

from .options import (
    fail_with,
    limit_options,
    limiter_from,
    megabytes,
    read_options,
    read_setup,
    run_async,
)
from .params import SIZE


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
    base = ""
    if result.checkpoint is not None:
        base = (f"the checkpoint at {result.checkpoint.describe()} "
                f"({result.checkpoint_blocks} blocks) and ")
    parts = [f"restored vdisk {vdisk} into {target}: {result.blocks} blocks "
             f"({result.sets} set, {result.deletes} deleted"
             + (f", {result.ranges} range deletes" if result.ranges else "")
             + f") from {base}"
             f"{result.aggregations} aggregations"]
    if result.epochs > 1:
        parts.append(f"{result.epochs} epochs, the last ({result.epoch}) with sequences "
                     f"{result.first_sequence}..{result.last_sequence}")
    elif result.first_sequence is not None:
        parts.append(f"sequences {result.first_sequence}..{result.last_sequence}")
    parts.append(f"{megabytes(result.data_bytes)} in {result.seconds:.2f} s "
                 f"({result.mb_per_s:.1f} MB/s)")
    if result.duplicates:
        parts.append(f"{result.duplicates} duplicate blocks skipped")
    if result.rebuilt:
        parts.append(f"{result.rebuilt} aggregations rebuilt from parity")
    if reader.down_servers:
        addresses = [reader.pool.servers[i].address for i in reader.down_servers]
        parts.append("unreachable: " + ", ".join(addresses))
    return "; ".join(parts)


@click.command("restore")
@read_options
@limit_options
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="Raw disk image to write (created; emptied first unless --keep-existing).")
@click.option("--output-redis", default=None, metavar="ADDRESS",
              help="Write the blocks into a Redis block store instead: one key per block. "
                   "host:port[@db] or redis[s]://[user@]host:port[/db][?ca=FILE&"
                   "password_file=FILE...], as --storage-addresses (login, TLS).")
@click.option("--redis-key-prefix", default=None,
              help="Key prefix of the Redis block store (default '<vdisk>:'); block i is "
                   "'<prefix><i>'.")
@click.option("--block-size", type=click.IntRange(min=1), default=DEFAULT_BLOCK_SIZE,
              show_default=True, help="Block size of the vdisk, in bytes.")
@click.option("--keep-existing", is_flag=True,
              help="Apply onto the image's current content instead of starting empty (to "
                   "replay a later range onto an earlier restore).")
@click.option("--size", type=SIZE, default=0, metavar="SIZE",
              help="Make the image at least this big: the vdisk's size (bytes, or 64M, "
                   "10G, 1T).")
@click.option("--sync", is_flag=True, help="fsync the image before exiting.")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar (default: when stderr is a terminal).")
@click.option("--check-block-hashes", is_flag=True,
              help="Also check every block's BLAKE2b in v2 records (tlog verify always "
                   "does). Their AES-GCM tag already proves each record is what tlogserver "
                   "sealed after checking the hashes itself; legacy records are always "
                   "checked.")
@click.option("--state-file", default=None, metavar="FILE",
              help="Where to record the image's tlog state (the point of the log it holds, "
                   "for tlog nbd) [default: beside the image, IMAGE.tlog-state; a block "
                   "device gets none unless given; a Redis block store keeps it in a key].")
@click.option("--pin", default=None, metavar="NAME",
              help="Restore the named restore point (tlog pin) instead of the newest state.")
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
    setup = read_setup(ctx, values)
    limiter = limiter_from(values)
    if values["pin"] is not None and not limiter.unbounded:
        raise click.UsageError("--pin names the point to restore: no --start-* / --end-* with it")
    storage: BlockStorage
    try:
        if values["output"] is not None:
            storage = FileBlockStorage(values["output"], values["block_size"],
                                       truncate=not values["keep_existing"], size=values["size"],
                                       sync=values["sync"])
        else:
            prefix = values["redis_key_prefix"]
            storage = RedisBlockStorage(ServerAddress.parse(values["output_redis"]),
                                        default_prefix(setup.vdisk) if prefix is None else prefix,
                                        values["block_size"], timeout=values["timeout"])
    except (StorageConfigError, PlayerError) as exc:
        raise click.UsageError(str(exc)) from None
    show = values["progress"] if values["progress"] is not None else sys.stderr.isatty()
    progress = _Progress(show)

    async def run() -> tuple[PlayResult, ChainReader]:
        nonlocal limiter
        if values["pin"] is not None:
            found = [p for p in await read_pins(setup.pool, setup.vdisk)
                     if p.name == values["pin"]]
            if not found:
                await storage.close()
                await setup.factory.close()
                raise PinError(f"vdisk {setup.vdisk} has no pin named {values['pin']!r} "
                               "(tlog pins lists them)")
            limiter = Limiter(end_seq=found[0].sequence, epoch=found[0].epoch)
        reader = ChainReader(setup.pool, setup.vdisk, setup.opener, limiter,
                             on_walk=progress.walked, timeout=values["timeout"],
                             block_hashes=values["check_block_hashes"])
        started = time.perf_counter()
        try:
            links = await reader.walk()
            if not links:
                raise NoLog(setup.vdisk)
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
        result, reader = run_async(run())
    except (DecodeError, PlayerError, PinError) as exc:
        fail_with(str(exc))
        return
    click.echo(_summary(setup.vdisk, result, storage.describe(), reader))
    if (limiter.start_seq or limiter.start_ts) and not values["keep_existing"]:
        return  # part of the log only: the image is no point of it
    try:
        note = _record_state(setup.vdisk, values, result)
    except (IntentError, OSError, redis.RedisError) as exc:
        fail_with(f"the image is restored, but its tlog state could not be recorded: {exc}")
        return
    if note:
        click.echo(note, err=True)


def _record_state(vdisk: str, values: dict[str, Any], result: PlayResult) -> str:
    """Record in the output the point of the log it holds now (`tlog.nbd.intent`), so that
    `tlog nbd` can serve it; what to tell the operator ("" for nothing)."""
    if result.last_sequence is not None:
        epoch, sequence = result.epoch, result.last_sequence
    elif result.checkpoint is not None:
        epoch, sequence = result.checkpoint.epoch, result.checkpoint.sequence
    else:
        return ""
    block_size = values["block_size"]
    intent: IntentLog
    if values["output"] is not None:
        output = values["output"]
        path = values["state_file"]
        if path is None:
            if not os.path.isfile(output):
                return (f"{output} is not a regular file: no tlog state recorded (give "
                        "--state-file to serve it with tlog nbd)")
            path = default_state_path(output)
        size = os.path.getsize(output)
        size -= size % block_size
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # whatever it recorded is not this image any more
        intent = FileIntentLog(path, block_size, size)
    else:
        address = ServerAddress.parse(values["output_redis"])
        prefix = values["redis_key_prefix"]
        prefix = default_prefix(vdisk) if prefix is None else prefix
        client = redis.Redis(**address.redis_kwargs(), socket_timeout=values["timeout"])
        intent = RedisIntentLog(client, prefix.encode(), block_size, values["size"],
                                f"redis {address}")
    try:
        record_agreement(intent, vdisk, epoch, sequence)
    finally:
        intent.close()
    return ""
