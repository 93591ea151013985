#!/usr/bin/env python3
"""A longer run of the differential wire fuzzer (`tests/fuzz_wire.py`): the modules of
`tlog.protocol` as imported (compiled when built) against pure copies of their .py files.

Runs the harness under libFuzzer (atheris) in a subprocess, for ``--runs N`` inputs or
``--seconds S``, keeping going after findings (one saved input per kind), then prints what
was compared, the runs done, the coverage reached and the findings, one ``name: value`` per
line. The corpus is kept between runs (``build/fuzz-wire/corpus`` by default), so each run
starts where the last one stopped. Exit status: 0 without findings, 1 with, 2 when the
fuzzer itself stopped (a signal in compiled code, an out-of-memory, a timeout).

Reproduce a finding: ``python -m tests.fuzz_wire build/fuzz-wire/findings/<name>`` from
the repository root (its ``.txt`` beside it says what differed).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "fuzz-wire"
#: libFuzzer's last status line: "#N DONE cov: C ft: F corp: U/Sb ...".
DONE = re.compile(r"^#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\S+)", re.M)
STAT = re.compile(r"^stat::(\w+):\s+(\S+)", re.M)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--runs", type=int, help="inputs to run")
    length.add_argument("--seconds", type=int, help="time to run for")
    parser.add_argument("--corpus", type=Path, default=BUILD / "corpus",
                        help="corpus directory, seeded when empty (default: %(default)s)")
    parser.add_argument("--findings", type=Path, default=BUILD / "findings",
                        help="where findings are saved (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="libFuzzer's seed (0: random)")
    parser.add_argument("--max-len", type=int, default=8192, help="largest input, bytes")
    parser.add_argument("--alter", nargs=3, action="append", default=[],
                        metavar=("FILE", "OLD", "NEW"),
                        help="edit the pure copy (to check that differences are found)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.corpus.mkdir(parents=True, exist_ok=True)
    args.findings.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in args.findings.glob("*.txt")}
    length = f"-runs={args.runs}" if args.runs is not None else f"-max_total_time={args.seconds}"
    cmd = [sys.executable, "-m", "tests.fuzz_wire", "--findings", str(args.findings)]
    for alteration in args.alter:
        cmd += ["--alter", *alteration]
    cmd += [length, f"-seed={args.seed}", f"-max_len={args.max_len}", "-timeout=20",
            "-print_final_stats=1", f"-artifact_prefix={args.findings}/", str(args.corpus)]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")
    assert proc.stdout is not None
    output = []
    for line in proc.stdout:
        output.append(line)
        # the harness's own lines, findings and libFuzzer's pulses; not every new unit
        if line.startswith(("fuzz_wire:", "FINDING", "==")) or "pulse " in line:
            print(line, end="", flush=True)
    rc = proc.wait()
    elapsed = time.monotonic() - started
    text = "".join(output)
    new = sorted(p for p in args.findings.glob("*.txt") if p.name not in before)
    banner = next((ln for ln in output if ln.startswith("fuzz_wire: ") and " vs " in ln), "")
    print(f"compared: {banner.removeprefix('fuzz_wire: ').strip() or '?'}")
    done = DONE.search(text)
    stats = dict(STAT.findall(text))
    if done:
        runs, cov, ft, units, size = done.groups()
        print(f"runs: {runs} in {elapsed:.0f} s ({stats.get('average_exec_per_sec', '?')}/s)")
        print(f"coverage: {cov} edges, {ft} features (libFuzzer's cov/ft of the pure copies)")
        print(f"corpus: {units} inputs ({size}), {stats.get('new_units_added', '?')} new this"
              f" run, in {args.corpus}")
        print(f"peak rss: {stats.get('peak_rss_mb', '?')} MB")
    print(f"findings: {len(new)} new ({len(before) + len(new)} in {args.findings})")
    for path in new:
        print(f"  {path.stem}: {path.read_text().splitlines()[0]}")
    if rc != 0 or not done:
        print(f"fuzzer stopped: exit status {rc}; its last lines:", file=sys.stderr)
        print("".join(output[-25:]), file=sys.stderr, end="")
        return 2
    return 1 if new else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
