"""`tlog slave-status`: where a vdisk's standby stands against the end of its log."""

from __future__ import annotations

import datetime
import json
from typing import Any

import click

from tlog.read.head import find_last
from tlog.read.standby import (
    StandbyError,
    StandbyStore,
    StandbyTarget,
    parse_slave_targets,
)
from tlog.record.pieces import DecodeError
from tlog.storage import ServerAddress, StorageConfigError, StorageError
from tlog.storage.blockstore import default_prefix

from .options import fail_with, read_options, read_setup, run_async


def _when(ns: int) -> str:
    if not ns:
        return "-"
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC).isoformat(
        timespec="seconds")


def _target(vdisk: str, slave: str | None, prefix: str | None,
            config: dict[str, Any]) -> StandbyTarget:
    if slave is not None:
        try:
            address = ServerAddress.parse(slave)
        except StorageConfigError as exc:
            raise click.UsageError(f"--slave: {exc}") from None
        return StandbyTarget(address, prefix or default_prefix(vdisk))
    try:
        targets = parse_slave_targets(config.get("vdisks"))
    except StorageConfigError as exc:
        raise click.UsageError(f"config: {exc}") from None
    if vdisk not in targets:
        raise click.UsageError(f"vdisk {vdisk}: no standby given: pass --slave HOST:PORT "
                               "or a --config whose vdisk entry has slave_sync and "
                               "slave_server")
    target = targets[vdisk]
    return StandbyTarget(target.address, prefix) if prefix else target


@click.command("slave-status")
@read_options
@click.option("--slave", default=None, metavar="ADDRESS",
              help="The standby's redis, host:port[@db] or redis[s]://... as --redis "
                   "(default: slave_server of the vdisk in --config).")
@click.option("--slave-prefix", default=None,
              help="Key prefix of the standby's blocks (default: slave_prefix in --config, "
                   "else '<vdisk>:').")
@click.option("--block-size", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Block size of the vdisk, in bytes.")
@click.option("--reset", is_flag=True,
              help="Delete the standby's blocks and position, so that slave sync rebuilds it "
                   "from the whole log when tlogserver next starts it (after a failover "
                   "ended it, once the standby is a standby again).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.pass_context
def slave_status_command(ctx: click.Context, **values: Any) -> None:
    """Show the position slave sync recorded in a vdisk's standby against the end of the
    vdisk's log: in step, behind (by how many sequences), or ended by a failover."""
    setup = read_setup(ctx, values)
    target = _target(setup.vdisk, values["slave"], values["slave_prefix"], setup.config)

    async def run() -> dict[str, Any]:
        store = StandbyStore(target, values["block_size"], timeout=values["timeout"])
        try:
            try:
                if values["reset"]:
                    return {"reset": await store.clear()}
                position = await store.position()
                served = await store.served_state()
            except StorageError as exc:  # (its message calls any redis a storage server)
                raise StorageError(f"standby {target.describe()}: "
                                   f"{str(exc).split(': ', 1)[-1]}") from None
            last = await find_last(setup.pool, setup.vdisk, setup.opener)
        finally:
            await store.close()
            await setup.factory.close()
        info: dict[str, Any] = {"vdisk": setup.vdisk, "standby": target.describe(),
                                "synced": position is not None}
        if served is not None:  # tlog nbd serves it: the vdisk failed over to it
            try:
                state = json.loads(served)
                info["live"] = {"epoch": state["epoch"], "sequence": state["sequence"]}
            except (ValueError, KeyError, TypeError):
                info["live"] = {}
        log_hash = last.hash.hex() if last is not None else None
        info["log"] = {"hash": log_hash, "epoch": last.epoch if last else 0,
                       "last_sequence": last.last_sequence if last else None}
        if position is None:
            info["in_step"] = last is None
            return info
        info["applied"] = {"hash": position.hash.hex(), "epoch": position.epoch,
                           "sequence": position.sequence,
                           "block_time": _when(position.timestamp),
                           "recorded": _when(position.applied_at)}
        info["ended"] = position.ended or None
        info["in_step"] = (position.hash.hex() == log_hash if last is not None
                           else position.sequence < 0)
        if not info["in_step"] and last is not None:
            info["behind_sequences"] = (last.last_sequence - position.sequence
                                        if last.epoch == position.epoch else None)
        return info

    try:
        info = run_async(run())
    except (StorageError, StandbyError, DecodeError) as exc:
        fail_with(str(exc))
        return
    if "reset" in info:
        click.echo(f"vdisk {setup.vdisk}: standby {target.describe()} reset "
                   f"({info['reset']} block key(s) deleted)")
        return
    if values["as_json"]:
        click.echo(json.dumps(info, sort_keys=True))
        return
    click.echo(_summary(info))


def _summary(info: dict[str, Any]) -> str:
    log_part = ("the log is empty" if info["log"]["hash"] is None else
                f"the log ends at {info['log']['hash'][:16]} (epoch {info['log']['epoch']}, "
                f"sequence {info['log']['last_sequence']})")
    head = f"vdisk {info['vdisk']}: standby {info['standby']}"
    live = info.get("live")
    if live is not None:
        since = (f" since epoch {live['epoch']} (sequence {live['sequence']})"
                 if live else "")
        ended = f"; slave sync ended ({info['ended']})" if info.get("ended") else ""
        return (f"vdisk {info['vdisk']}: {info['standby']} is the live disk: the vdisk failed "
                f"over to it and tlog nbd serves it{since}; the log goes on from it{ended}; "
                f"{log_part}")
    if not info["synced"]:
        return f"{head}: never synced; {log_part}"
    applied = info["applied"]
    at = (f"at epoch {applied['epoch']} sequence {applied['sequence']} (blocks up to "
          f"{applied['block_time']}, recorded {applied['recorded']})")
    if info["in_step"]:
        state = "in step"
    elif info.get("behind_sequences") is not None:
        state = f"behind by {info['behind_sequences']} sequence(s)"
    else:
        state = "behind (an earlier epoch)"
    ended = f"; slave sync ended ({info['ended']}): it is not written any more" \
        if info["ended"] else ""
    return f"{head} {at}; {log_part}: {state}{ended}"
