"""`tlog inspect`: list a vdisk's aggregations, one line (or JSON object) each."""

from __future__ import annotations

import json
from typing import Any

import click

from tlog.read.chain import ChainReader
from tlog.read.head import NoLog
from tlog.record.aggregation import describe
from tlog.record.pieces import DecodeError

from .options import fail_with, read_options, read_setup, run_async


def _line(info: dict[str, Any]) -> str:
    return (f"{info['hash']} seq {info['first_sequence']}..{info['last_sequence']} "
            f"blocks {info['blocks']} time {info['timestamp']} "
            f"block-times {info['first_block_timestamp']}..{info['last_block_timestamp']} "
            f"data {info['data_bytes']} record {info['record_bytes']} "
            f"compressed {info['compressed_bytes']} {info['format']}"
            + (f" checkpoint {info['checkpoint']}" if info.get("checkpoint") else ""))


@click.command("inspect")
@read_options
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per line (hash, prev, first_sequence, last_sequence, "
                   "blocks, timestamps, sizes, format, key_id).")
@click.pass_context
def inspect_command(ctx: click.Context, **values: Any) -> None:
    """List a vdisk's aggregations, oldest first, one per line.

    Each line: hash, sequence range, number of blocks, the aggregation's timestamp and its
    blocks' timestamps, data / record / compressed sizes in bytes, record format. Every
    aggregation listed has been checked like a restore checks it. A compacted log starts
    with the parts of its checkpoint ("checkpoint 1/2 of the state after <hash>").
    """
    setup = read_setup(ctx, values)
    as_json = values["as_json"]

    async def run() -> int:
        reader = ChainReader(setup.pool, setup.vdisk, setup.opener)
        count = 0
        try:
            async for item in reader.items():
                info = dict(describe(item.aggregation))
                if item.checkpoint is not None and reader.base is not None:
                    # A part of the checkpoint the log starts from: it stands for the state
                    # at the checkpoint's sequence (its blocks are each index's last write).
                    info["first_sequence"] = info["last_sequence"] = reader.base.sequence
                click.echo(json.dumps(info, sort_keys=False) if as_json else _line(info))
                count += 1
        finally:
            await setup.factory.close()
        return count

    try:
        count = run_async(run())
    except DecodeError as exc:
        fail_with(str(exc))
        return
    if count == 0:
        fail_with(str(NoLog(setup.vdisk)))
