"""`tlog rekey`: re-encrypt a vdisk's log under the current master key, to retire old keys
(the storage and key options of ``tlog restore``; `tlog.read.rekey` does the work)."""

from __future__ import annotations

from typing import Any

import click

from tlog.read.rekey import RekeyError, rekey_vdisk
from tlog.record.pieces import DecodeError

from .options import EXIT_FAILED, read_options, read_setup, write_version


@click.command("rekey")
@read_options
@click.option("--delete-old", is_flag=True,
              help="Delete the records that were re-encrypted, and keep only the new head in "
                   "the last-hash lists (needed to stop depending on the old key's storage "
                   "copies; makes the old chain unreadable).")
@click.option("--dry-run", is_flag=True,
              help="Read and check the chain, count its aggregations per key id, write nothing.")
@click.pass_context
def rekey_command(ctx: click.Context, **values: Any) -> None:
    """Re-encrypt a vdisk's log under the current master key, to retire an old key.

    The first --key-file (or --priv-key) is the current key: records not sealed with it are
    sealed again with it. Every other key the log was written with must be given too
    (--old-key-file, or more --key-file). Stop the vdisk's clients first: the vdisk must not
    be written during the rekey (checked before the switch). Exit status 1 on failure.
    """
    if values["record_format"] == "legacy":
        raise click.UsageError("rekey writes tlog's own records (v3, or v2 with --format v2): "
                               "use --format auto (with --nonce) to convert a legacy log")
    setup = read_setup(ctx, values)
    keyring = setup.opener.keyring
    new_key = keyring.keys[keyring.ids[0]]
    try:
        report = setup.run(rekey_vdisk(setup.pool, setup.vdisk, setup.opener, new_key,
                                       delete_old=values["delete_old"],
                                       dry_run=values["dry_run"],
                                       version=write_version(values)))
    except (RekeyError, DecodeError) as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_FAILED) from None
    click.echo(report.summary())
