"""`tlog verify`: check a vdisk's whole chain and every piece of it."""

from __future__ import annotations

import sys
from typing import Any

import click

from tlog.read.head import NoLog
from tlog.read.verify import verify_chain

from .options import EXIT_FAILED, fail_with, read_options, read_setup


@click.command("verify")
@read_options
@click.option("--allow-gaps", is_flag=True,
              help="Do not count missing sequences between aggregations as an error.")
@click.pass_context
def verify_command(ctx: click.Context, **values: Any) -> None:
    """Check a vdisk's whole chain: every piece, record hash, AES-GCM tag, prev link and
    block hash, and that the sequences have no gaps.

    Exit status 0 when the chain is sound (pieces rebuilt from parity are reported as
    warnings), 1 otherwise, naming the first bad aggregation.
    """
    setup = read_setup(ctx, values)
    report = setup.run(verify_chain(setup.pool, setup.vdisk, setup.opener,
                                    allow_gaps=values["allow_gaps"]))
    for problem in report.problems:
        click.echo(str(problem), err=True)
    if report.errors:
        first = report.errors[0]
        name = first.key.hex() if first.key is not None else "(none)"
        click.echo(f"vdisk {setup.vdisk}: chain NOT sound; first bad aggregation {name}: "
                   f"{first.message}")
        sys.exit(EXIT_FAILED)
    if report.aggregations == 0 and report.checkpoint is None:
        fail_with(str(NoLog(setup.vdisk)))
    warnings = f", {len(report.warnings)} warnings" if report.warnings else ""
    epochs = ""
    if len(report.epochs) > 1 or (report.epochs and report.epochs[0][0]):
        epochs = f" (of epoch {report.epochs[-1][0]}; {len(report.epochs)} epochs)"
        for number, key, start in report.epochs:
            click.echo(f"epoch {number}: from aggregation {key.hex()} (sequence {start})",
                       err=True)
    copies = f", {report.copies} re-flushed copies" if report.copies else ""
    base = ""
    if report.checkpoint is not None:
        base = (f"from a checkpoint at {report.checkpoint.describe()} "
                f"({report.checkpoint_blocks} blocks in {report.checkpoint_parts} parts), then ")
    sequences = (f", sequences {report.first_sequence}..{report.last_sequence}"
                 if report.first_sequence is not None else "")
    click.echo(f"vdisk {setup.vdisk}: chain sound: {base}{report.aggregations} aggregations, "
               f"{report.blocks} blocks{copies}{sequences}{epochs}{warnings}")
