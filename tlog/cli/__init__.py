"""`tlog` command line: restore, inspect, verify, repair, rekey and compact a vdisk's log and
pin restore points in it; send blocks to a server; serve a vdisk over NBD.

`restore`, `inspect`, `verify`, `repair` and `rekey` read the storage the way tlogserver
writes it, so they take the server's storage and key options (``--storage-addresses`` or
``--config``, ``-k``, ``-m``, ``--priv-key`` or ``--key-file``, ``--nonce``), also from the
same ``TLOG_*`` environment variables and from the same YAML config file
(`tlog.cli.options`). One module per command.
"""

from __future__ import annotations

import logging
from importlib import metadata

import click

from .compact import compact_command
from .inspect import inspect_command
from .nbd import nbd_command
from .pin import pin_command, pins_command, unpin_command
from .rekey import rekey_command
from .repair import repair_command
from .restore import restore_command
from .send import send_command
from .slavestatus import slave_status_command
from .verify import verify_command

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"],
                               "auto_envvar_prefix": "TLOG"})
def cli() -> None:
    """Tools for tlog: read back, check and replay a vdisk's transaction log."""


for _command in (restore_command, inspect_command, verify_command, repair_command,
                 rekey_command, send_command, nbd_command, slave_status_command,
                 compact_command, pin_command, unpin_command, pins_command):
    cli.add_command(_command)


def _plugin_commands() -> None:
    """Commands other packages register under the ``tlog.commands`` entry point (the
    daemon's ``tlog config``)."""
    for entry in metadata.entry_points(group="tlog.commands"):
        try:
            cli.add_command(entry.load(), entry.name)
        except ImportError as exc:  # a partial installation: say so, keep the rest
            logging.getLogger("tlog").debug("tlog %s unavailable: %s", entry.name, exc)


_plugin_commands()


def main() -> None:
    """The ``tlog`` entry point."""
    cli(prog_name="tlog")
