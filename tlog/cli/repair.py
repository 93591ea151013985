"""`tlog repair`: rebuild the pieces a vdisk's aggregations are missing.

Takes the storage and key options of ``tlog restore`` (`tlog.cli.options`), and reports in
one line what it rewrote; see `tlog.read.repair` for what it looks at.
"""

from __future__ import annotations

from typing import Any

import click

from tlog.read.head import NoLog
from tlog.read.repair import RepairReport, repair_vdisk

from .options import fail_with, read_options, read_setup


def _summary(vdisk: str, report: RepairReport, addresses: list[str]) -> str:
    verb = "would rewrite" if report.dry_run else "rewrote"
    parts = [f"vdisk {vdisk}: {report.aggregations} aggregations checked "
             f"({report.recorded} recorded as missing pieces, {report.scanned} more from the "
             f"chain); {verb} {report.pieces} pieces"]
    if report.rewritten:
        parts.append(", ".join(f"{n} on {addresses[i]}"
                               for i, n in sorted(report.rewritten.items())))
    if report.found_by_scan:
        parts.append(f"{report.found_by_scan} of them found by the scan only")
    if report.markers_cleared:
        parts.append(f"{report.markers_cleared} markers cleared")
    if report.lists_restored:
        parts.append("last-hash list restored on "
                     + ", ".join(addresses[i] for i in report.lists_restored))
    if report.unreachable:
        parts.append("unreachable: " + ", ".join(addresses[i] for i in report.unreachable))
    return "; ".join(parts)


@click.command("repair")
@read_options
@click.option("--scan/--no-scan", default=True, show_default=True,
              help="Also walk the whole chain and check every piece of every aggregation "
                   "(finds pieces lost without a record, e.g. a server restarted empty); "
                   "--no-scan only looks at the aggregations recorded as missing pieces.")
@click.option("--dry-run", is_flag=True, help="Report what would be rewritten, write nothing.")
@click.pass_context
def repair_command(ctx: click.Context, **values: Any) -> None:
    """Rebuild missing or corrupt pieces of a vdisk's aggregations from the others.

    tlogserver records the pieces a degraded flush could not store (a storage server
    down); this rewrites them once the server is back, and with --scan (the default) also
    every piece found missing or corrupt along the chain. Safe to run while tlogserver
    writes the vdisk, and again at any time. Exit status 0 when every piece is in place,
    1 when some could not be rewritten (a server still down, or fewer than k pieces left).
    """
    setup = read_setup(ctx, values)
    addresses = [s.address for s in setup.pool.servers]
    report = setup.run(repair_vdisk(setup.pool, setup.vdisk, setup.opener,
                                    scan=values["scan"], dry_run=values["dry_run"]))
    if report.aggregations == 0 and not report.unreachable and not report.problems:
        fail_with(str(NoLog(setup.vdisk)))
    for problem in report.problems:
        click.echo(f"error: {problem}", err=True)
    click.echo(_summary(setup.vdisk, report, addresses))
    if not report.complete:
        fail_with("some pieces could not be repaired"
                       + (" (servers unreachable)" if report.unreachable else ""))
