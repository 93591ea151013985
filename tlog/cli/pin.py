"""`tlog pin`, `tlog unpin`, `tlog pins`: named restore points that compaction keeps."""

from __future__ import annotations

import json
from typing import Any

import click

from tlog.read.chain import ChainReader
from tlog.read.checkpoints import RetentionError, describe_time
from tlog.read.head import NoLog
from tlog.read.limiter import Limiter
from tlog.record.pieces import DecodeError
from tlog.retention import Pin, PinError, add_pin, read_pins, remove_pin
from tlog.retention.lock import CompactionBusy, CompactionLock

from .options import ReadSetup, fail_with, read_options, read_setup

#: Seconds `tlog pin` waits for a compaction of the vdisk to end.
LOCK_WAIT = 60.0


async def resolve_point(setup: ReadSetup, sequence: int | None, epoch: int | None,
                        timestamp: int | None) -> tuple[int, int, int]:
    """(epoch, sequence, timestamp) of a point of the log, checked to be restorable:
    the head by default, a sequence (of the current epoch unless given) or the last write
    at or before a timestamp."""
    try:
        return await _resolve_point(setup, sequence, epoch, timestamp)
    except RetentionError as exc:  # the point was compacted away
        what = exc.wanted.removeprefix("end ") or "that point"
        oldest = (f"; the oldest point left is {exc.oldest.describe()}"
                  if exc.oldest is not None else "")
        raise PinError(f"vdisk {setup.vdisk}: cannot pin {what}: it was compacted away (it "
                       f"is before the retained log){oldest}") from None


async def _resolve_point(setup: ReadSetup, sequence: int | None, epoch: int | None,
                         timestamp: int | None) -> tuple[int, int, int]:
    if timestamp is not None:
        reader = ChainReader(setup.pool, setup.vdisk, setup.opener, Limiter(end_ts=timestamp))
        best: tuple[int, int, int] | None = None
        async for item in reader.items():
            if item.checkpoint is not None:
                # Its blocks are of several epochs' numberings: the checkpoint's own point.
                base = reader.base
                assert base is not None
                candidates = [(base.epoch, base.sequence, base.timestamp)]
            else:
                candidates = [(item.aggregation.epoch, b.sequence, b.timestamp)
                              for b in item.blocks]
            for point in candidates:
                if best is None or point[:2] > best[:2]:
                    best = point
        if best is None:
            raise PinError(f"vdisk {setup.vdisk}: no write at or before {timestamp}")
        return best
    reader = ChainReader(setup.pool, setup.vdisk, setup.opener,
                         Limiter(end_seq=sequence or 0, epoch=epoch), cache_bytes=0)
    links = await reader.walk()
    if not links:
        raise NoLog(setup.vdisk)
    head = links[-1]
    if sequence is None:
        return head.epoch, head.last_sequence, head.timestamp
    target = head.epoch if epoch is None else epoch
    for link in reversed(links):
        if link.epoch == target and link.first_sequence <= sequence <= link.last_sequence:
            return target, sequence, link.timestamp
    raise PinError(f"vdisk {setup.vdisk}: sequence {sequence} of epoch {target} is not in "
                   "its log")


def _show(pin: Pin) -> str:
    epoch = f" of epoch {pin.epoch}" if pin.epoch else ""
    return (f"{pin.name}: sequence {pin.sequence}{epoch}, written by "
            f"{describe_time(pin.timestamp)}, pinned {describe_time(pin.created)}")


@click.command("pin")
@read_options
@click.option("--name", required=True, help="The restore point's name (unique per vdisk).")
@click.option("--sequence", type=click.IntRange(min=0), default=None,
              help="Pin the state after this sequence (default: the newest write).")
@click.option("--epoch", type=click.IntRange(min=0), default=None,
              help="The epoch --sequence is of (default: the current one).")
@click.option("--timestamp", type=click.IntRange(min=0), default=None,
              help="Pin the state at this block timestamp (the newest write at or before).")
@click.pass_context
def pin_command(ctx: click.Context, **values: Any) -> None:
    """Name a restore point of a vdisk: compaction keeps it restorable until `tlog unpin`.
    Restore it with `tlog restore --pin NAME`."""
    if values["sequence"] is not None and values["timestamp"] is not None:
        raise click.UsageError("give --sequence or --timestamp, not both")
    if values["epoch"] is not None and values["sequence"] is None:
        raise click.UsageError("--epoch qualifies --sequence")
    if values["sequence"] == 0:
        raise click.UsageError("--sequence 0: a restore bound of 0 means unbounded; pin a "
                               "later point")
    setup = read_setup(ctx, values)

    async def pin_point() -> Pin:
        # The compaction lease, held while the point is checked and the pin stored: no
        # compaction can cut past the point in between.
        lock = CompactionLock(setup.pool, setup.vdisk)
        try:
            await lock.acquire_within(LOCK_WAIT)
        except CompactionBusy as exc:
            raise PinError(f"{exc}; pin again once it is done") from None
        try:
            epoch, sequence, ts = await resolve_point(setup, values["sequence"],
                                                      values["epoch"], values["timestamp"])
            return await add_pin(setup.pool, setup.vdisk, values["name"], epoch, sequence, ts)
        finally:
            await lock.release()

    try:
        pin = setup.run(pin_point())
    except (PinError, DecodeError) as exc:
        fail_with(str(exc))
        return
    click.echo(f"vdisk {setup.vdisk}: pinned {_show(pin)}")


@click.command("unpin")
@read_options
@click.option("--name", required=True, help="The restore point to forget.")
@click.pass_context
def unpin_command(ctx: click.Context, **values: Any) -> None:
    """Forget a named restore point (the next compaction may cut past it)."""
    setup = read_setup(ctx, values)
    try:
        pin = setup.run(remove_pin(setup.pool, setup.vdisk, values["name"]))
    except PinError as exc:
        fail_with(str(exc))
        return
    click.echo(f"vdisk {setup.vdisk}: unpinned {_show(pin)}")


@click.command("pins")
@read_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def pins_command(ctx: click.Context, **values: Any) -> None:
    """List a vdisk's named restore points, oldest first."""
    setup = read_setup(ctx, values)
    try:
        pins = setup.run(read_pins(setup.pool, setup.vdisk))
    except PinError as exc:
        fail_with(str(exc))
        return
    if values["as_json"]:
        click.echo(json.dumps([{"name": p.name, "epoch": p.epoch, "sequence": p.sequence,
                                "timestamp": p.timestamp, "created": p.created}
                               for p in pins]))
        return
    for pin in pins:
        click.echo(_show(pin))
    if not pins:
        click.echo(f"vdisk {setup.vdisk}: no pins")
