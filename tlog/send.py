"""`tlog send`: log N blocks to a tlogserver and report throughput and latencies."""

from __future__ import annotations

import click


@click.command()
def send_command() -> None:
    """Send blocks to a tlogserver (not implemented yet)."""
    raise click.ClickException("not implemented yet")
