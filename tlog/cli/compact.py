"""`tlog compact`: replace the oldest part of a vdisk's log by a checkpoint and delete it."""

from __future__ import annotations

import sys
from typing import Any

import click

from tlog.read.head import NoLog
from tlog.record.aggregation import V2Writer
from tlog.record.pieces import DecodeError
from tlog.retention import CompactionError, Compactor, RetentionPolicy, parse_duration, parse_size

from .options import fail_with, read_options, read_setup, run_async, write_version


def _policy(values: dict[str, Any]) -> RetentionPolicy:
    since, sequences, size = values["keep_since"], values["keep_sequences"], values["keep_bytes"]
    if since is None and sequences is None and size is None:
        raise click.UsageError("say what to keep: --keep-since, --keep-sequences or "
                               "--keep-bytes (or several)")
    try:
        return RetentionPolicy(None if since is None else parse_duration(since), sequences,
                               None if size is None else parse_size(size))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@click.command("compact")
@read_options
@click.option("--keep-since", metavar="DURATION", default=None,
              help="Keep every point of the last DURATION restorable (90s, 15m, 2h, 7d, 1w), "
                   "by the aggregations' flush times.")
@click.option("--keep-sequences", type=click.IntRange(min=1), default=None, metavar="N",
              help="Keep at least the newest N sequences (blocks) as individual writes.")
@click.option("--keep-bytes", metavar="SIZE", default=None,
              help="Keep about SIZE of the newest aggregations (stored bytes, every piece on "
                   "every server: 500MB, 10GiB).")
@click.option("--dry-run", is_flag=True, help="Say what would be compacted; change nothing.")
@click.option("--progress/--no-progress", default=None,
              help="Show the steps and a progress bar (default: when stderr is a terminal).")
@click.pass_context
def compact_command(ctx: click.Context, **values: Any) -> None:
    """Compact a vdisk's log: write a checkpoint (the live blocks) at the cut the policy
    gives, then delete the aggregations before it.

    With several --keep-* limits the most is kept. Pinned restore points (tlog pin) and the
    servers' newest aggregations are never compacted away. Writes go on meanwhile. A run
    that is interrupted (even by kill -9) leaves a log that verifies and restores; the next
    run finishes it. Needs every storage server and the vdisk's current master key (the
    first --key-file). Prints a one-line summary.
    """
    policy = _policy(values)
    setup = read_setup(ctx, values)
    keyring = setup.opener.keyring
    writer = V2Writer(keyring.keys[keyring.ids[0]], setup.vdisk, write_version(values))
    show = values["progress"] if values["progress"] is not None else sys.stderr.isatty()
    # The steps go to stderr as they start (also without a terminal: a log names them).
    bar: list[Any] = []

    def on_step(name: str) -> None:
        if bar:
            bar.pop().__exit__(None, None, None)
        click.echo(f"tlog compact: {name}", err=True)

    def on_progress(done: int, total: int) -> None:
        if not show:
            return
        if not bar:
            bar.append(click.progressbar(length=total, label="deleting aggregations",
                                         file=sys.stderr))
            bar[0].__enter__()
        bar[0].update(done - bar[0].pos)

    async def run() -> str:
        compactor = Compactor(setup.pool, setup.vdisk, setup.opener, writer,
                              timeout=values["timeout"], on_step=on_step,
                              on_progress=on_progress)
        try:
            plan, summary = await compactor.compact(policy, dry_run=values["dry_run"])
        finally:
            await setup.factory.close()
        if bar:
            bar.pop().__exit__(None, None, None)
        if not plan.records and not plan.kept and plan.base is None:
            raise NoLog(setup.vdisk)
        if values["dry_run"]:
            return "dry run: " + plan.describe()
        return summary.line()

    try:
        click.echo(run_async(run()))
    except (CompactionError, DecodeError) as exc:
        fail_with(str(exc))
