"""`tlog` command line: restore, inspect, verify, repair, rekey and compact a vdisk's log and
pin restore points in it; send blocks to a server; serve a vdisk over NBD.

`restore`, `inspect`, `verify`, `repair` and `rekey` read the storage the way tlogserver
writes it, so they take the server's storage and key options (``--storage-addresses`` or
``--config``, ``-k``, ``-m``, ``--priv-key`` or ``--key-file``, ``--nonce``), also from the
same ``TLOG_*`` environment variables and from the same config, a YAML file or a fleet's etcd
keys (`tlog.cli.options`, `tlog.configsource`). One module per command.
"""

from __future__ import annotations

import importlib
import logging
from importlib import metadata
from typing import Any

import click

__all__ = ["cli", "main"]

#: Each command's module and object, imported only when the command runs (or is listed by
#: --help): a command pays for its own imports, not for every other command's.
COMMANDS = {
    "restore": "restore:restore_command",
    "inspect": "inspect:inspect_command",
    "verify": "verify:verify_command",
    "repair": "repair:repair_command",
    "rekey": "rekey:rekey_command",
    "send": "send:send_command",
    "nbd": "nbd:nbd_command",
    "slave-status": "slavestatus:slave_status_command",
    "compact": "compact:compact_command",
    "pin": "pin:pin_command",
    "unpin": "pin:unpin_command",
    "pins": "pin:pins_command",
}


class LazyGroup(click.Group):
    """A group whose commands are imported when used: `COMMANDS`, and those other packages
    register under the ``tlog.commands`` entry point (the daemon's ``tlog config``)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(COMMANDS) | {e.name for e in metadata.entry_points(group="tlog.commands")}
        return sorted(names)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is not None:
            module, attr = target.split(":")
            command: Any = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
            return command  # type: ignore[no-any-return]
        for entry in metadata.entry_points(group="tlog.commands", name=name):
            try:
                return entry.load()  # type: ignore[no-any-return]
            except ImportError as exc:  # a partial installation: say so, keep the rest
                logging.getLogger("tlog").debug("tlog %s unavailable: %s", name, exc)
        return None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"],
                                              "auto_envvar_prefix": "TLOG"})
def cli() -> None:
    """Tools for tlog: read back, check and replay a vdisk's transaction log."""


def main() -> None:
    """The ``tlog`` entry point."""
    cli(prog_name="tlog")
