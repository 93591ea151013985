"""What `tlog nbd`'s crash bookkeeping (the intent log, docs/nbd.md "After a crash") costs
per write, measured in this process on a real state file, without the noise of a whole NBD
path around it.

Per run, on a ``--size`` device of 4 KiB blocks with its state file in a scratch directory:

- ``mark_random_4k_us``: `FileIntentLog.mark` of one block at a random index (fio's random
  4 KiB writes), regions already marked (the steady state);
- ``mark_seq_256k_us``: `mark` of 64 blocks, sequentially (nbdcopy's 256 KiB requests),
  regions already marked;
- ``region_mark_ms``: the first write into an unmarked 4 MiB region, which syncs the state
  file (``fdatasync``) before it returns: once per region per checkpoint interval;
- ``checkpoint_ms``: `begin_checkpoint` + `end_checkpoint` after a checkpoint interval of
  random 4 KiB marks (the background checkpoint's own bookkeeping, without its waits);
- ``image_sync_64m_ms``: ``fdatasync`` of an image with 64 MiB just written, what each
  background checkpoint (every ``--checkpoint-bytes``, 64 MiB) makes the device do, in its
  own thread while writes go on.

Set against the time of one write through `tlog nbd` (about 100-130 us per 4 KiB write at
queue depth 16 on this machine: benchmarks/nbd.py), the per-write marks are the cost that
every write pays. One JSON object per run, then medians.

    .venv/bin/python benchmarks/intent_cost.py --runs 5
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit, machine, scratch_dir, summarize, table  # noqa: E402
from tlog.nbd.intent import REGION_BYTES, FileIntentLog, record_agreement  # noqa: E402
from tlog.units import parse_size  # noqa: E402

BLOCK = 4096


def per_call_us(calls: list[tuple[int, int]], log: FileIntentLog) -> float:
    start = time.perf_counter()
    for first, count in calls:
        log.mark(first, count)
    return (time.perf_counter() - start) / len(calls) * 1e6


def one_run(tmp: Path, size: int, marks: int, rng: random.Random) -> dict[str, float]:
    blocks = size // BLOCK
    state = tmp / "vd.img.tlog-state"
    state.unlink(missing_ok=True)
    log = FileIntentLog(str(state), BLOCK, size)
    try:
        record_agreement(log, "vd", 0, 0)
        # Every region marked once: the steady state the per-write figures are about.
        for first in range(0, blocks, log.region_blocks):
            log.mark(first, 1)
        random_calls = [(rng.randrange(blocks), 1) for _ in range(marks)]
        seq_calls = [(first % (blocks - 64), 64) for first in range(0, marks * 64, 64)]
        out = {"mark_random_4k_us": per_call_us(random_calls, log),
               "mark_seq_256k_us": per_call_us(seq_calls, log)}
        start = time.perf_counter()
        token = log.begin_checkpoint()
        log.end_checkpoint(token)  # every region is cold now: unmarked
        out["checkpoint_ms"] = (time.perf_counter() - start) * 1e3
        regions = min(64, blocks // log.region_blocks)
        start = time.perf_counter()
        for region in range(regions):
            log.mark(region * log.region_blocks, 1)
        out["region_mark_ms"] = (time.perf_counter() - start) / regions * 1e3
    finally:
        log.close()
    image = tmp / "vd.img"
    chunk = os.urandom(1 << 20)
    fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        for mib in range(64):
            os.pwrite(fd, chunk, mib << 20)
        start = time.perf_counter()
        os.fdatasync(fd)
        out["image_sync_64m_ms"] = (time.perf_counter() - start) * 1e3
    finally:
        os.close(fd)
        image.unlink()
    return {k: round(v, 3) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="the device's size")
    parser.add_argument("--marks", type=int, default=100_000, help="marks timed per figure")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    size = parse_size(args.size)
    if size < REGION_BYTES:
        raise SystemExit("--size: at least one 4 MiB region")
    rng = random.Random(27)
    runs = []
    with scratch_dir("tlogbench-intent") as tmp:
        for run in range(args.runs):
            result = one_run(tmp, size, args.marks, rng)
            emit({"benchmark": "intent_cost", "run": run, **result})
            runs.append(result)
    summary = summarize(runs, list(runs[0]))
    emit({"benchmark": "intent_cost", "size": args.size, "runs": args.runs,
          "summary": summary, "machine": machine()})
    table("tlog nbd's intent log, per write and per checkpoint", list(summary.items()))


if __name__ == "__main__":
    main()
