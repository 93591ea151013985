"""`tlog` command line: restore, inspect and verify a vdisk's log; send blocks to a server."""

from __future__ import annotations

import click

from .send import send_command


@click.group(context_settings={"help_option_names": ["-h", "--help"],
                               "auto_envvar_prefix": "TLOG"})
def cli() -> None:
    """Tools for tlog: read back, check and replay a vdisk's transaction log."""


cli.add_command(send_command, "send")


def main() -> None:
    cli(prog_name="tlog")
