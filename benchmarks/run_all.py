"""`make bench`: every benchmark, one after the other, into one JSON report.

Runs micro, ingest, restore (random and compressible blocks, flush size 25 and 250), the
server alone (batched and one block per write), compact, the event loop's stalls
(loop_stall), memory, nbd, nbd_recovery and intent_cost with their defaults (``--quick``:
small sizes, one run each, to check that they work), passing each script's
JSON lines through to stdout as they come and writing them all to ``--output`` (default
``benchmarks/results/latest.json``: ``{"machine": ..., "benchmarks": {"micro": [...],
...}}``). Each script prints its own table on stderr.

    make bench
    .venv/bin/python benchmarks/run_all.py --only restore,memory
    .venv/bin/python benchmarks/run_all.py --quick
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402

HERE = Path(__file__).resolve().parent

#: Each benchmark's script and its arguments: (full run, quick run).
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "micro": ("micro.py", ["--runs", "5"], ["--runs", "1", "--scale", "0.05"]),
    "ingest": ("ingest.py", ["--runs", "3"],
               ["--runs", "1", "--blocks", "2000", "--flush-sizes", "25", "--data",
                "compressible"]),
    "restore": ("restore.py", ["--runs", "3", "--gib", "1"],
                ["--runs", "1", "--blocks", "2000"]),
    "restore_compressible": ("restore.py", ["--runs", "3", "--gib", "1", "--compressible"],
                             ["--runs", "1", "--blocks", "2000", "--compressible"]),
    "restore_flush250": ("restore.py", ["--runs", "3", "--gib", "1", "--flush-size", "250"],
                         ["--runs", "1", "--blocks", "2000", "--flush-size", "250"]),
    # the server alone, fed pre-encoded blocks: 64 per send(), and one per send() (as an NBD
    # server or 0-Disk's Go client writes) at 25,000 and 12,500 blocks/s
    "server_batched": ("server_ingest.py", ["--runs", "3", "--blocks", "60000"],
                       ["--runs", "1", "--blocks", "2000"]),
    "server_per_block": ("server_ingest.py", ["--runs", "3", "--blocks", "60000",
                                              "--write-per-block", "--rate", "25000"],
                         ["--runs", "1", "--blocks", "2000", "--write-per-block", "--rate",
                          "25000"]),
    "server_per_block_12k5": ("server_ingest.py", ["--runs", "3", "--blocks", "50000",
                                                   "--write-per-block", "--rate", "12500"],
                              ["--runs", "1", "--blocks", "2000", "--write-per-block",
                               "--rate", "12500"]),
    "compact": ("compact.py", ["--runs", "3"],
                ["--runs", "1", "--blocks", "2000", "--indexes", "300", "--keep", "500"]),
    "loop_stall": ("loop_stall.py", ["--runs", "3"],
                   ["--runs", "1", "--flush-blocks", "100", "--flush-size", "10",
                    "--compact-blocks", "2000", "--indexes", "300"]),
    "memory": ("memory.py", [], ["--vdisks", "20", "--flood-blocks", "2000"]),
    "nbd": ("nbd.py", ["--runs", "3", "--mib", "256"],
            ["--runs", "1", "--mib", "4", "--writes", "500", "--fio-seconds", "1"]),
    "nbd_recovery": ("nbd_recovery.py", ["--runs", "3"],
                     ["--runs", "1", "--size", "1G", "--regions", "2"]),
    "intent_cost": ("intent_cost.py", ["--runs", "5"],
                    ["--runs", "1", "--size", "64M", "--marks", "2000"]),
}


def run(name: str, quick: bool, extra: list[str]) -> list[dict[str, Any]]:
    """Run one benchmark script; its JSON objects (its stderr goes to ours)."""
    script, full, small = BENCHMARKS[name]
    cmd = [sys.executable, str(HERE / script), *(small if quick else full), *extra]
    print(f"== {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    objects = []
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        line = line.strip()
        if line.startswith("{"):
            objects.append(json.loads(line))
    if proc.wait() != 0:
        raise SystemExit(f"benchmark {name} failed with exit status {proc.returncode}")
    print(f"== {name} took {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return objects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help="comma-separated benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, one run each: checks that they work")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "latest.json")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    report: dict[str, Any] = {"machine": machine(), "quick": args.quick, "benchmarks": {}}
    for name in names:
        report["benchmarks"][name] = run(name, args.quick, [])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"report written to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
