"""Compaction: `tlog compact` of a logged vdisk, and what it buys.

Per run, 6 fresh local redis-server processes (k=4, m=2) get ``--blocks`` 4 KiB blocks
(random data, flush size 25) written over ``--indexes`` block indexes at random, 10 % of
them deletes, sealed and stored in process as tlogserver lays them out. Then, timed:

- ``tlog restore`` of the whole log, before;
- ``tlog compact --keep-sequences KEEP``: wall seconds, its CPU seconds (worker processes
  included), its peak RSS (the largest of the command and its workers), MB/s of covered log
  (block data of the aggregations it replaced over its wall time);
- Redis ``used_memory`` (all 6 servers) before and after;
- ``tlog restore`` again, after: it starts from the checkpoint.

    .venv/bin/python benchmarks/compact.py --runs 3
    .venv/bin/python benchmarks/compact.py --blocks 20000 --runs 1
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RedisPool,
    children_cpu,
    emit,
    load_average,
    machine,
    scratch_dir,
    storage_args,
    summarize,
    table,
    tlog_command,
)
from benchmarks.restore import BLOCK, VDISK, fill_direct  # noqa: E402


def used_memory(redis: RedisPool) -> int:
    import redis as redis_py

    total = 0
    for address in redis.addresses:
        host, port = address.split(":")
        client = redis_py.Redis(host=host, port=int(port))
        try:
            total += int(client.info("memory")["used_memory"])
        finally:
            client.close()
    return total


#: Runs a command and prints the largest RSS (KiB) of it and its children on stderr.
_PEAK = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
         "print('peak-rss-kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
         "file=sys.stderr); sys.exit(code)")


def timed(argv: list[str]) -> tuple[float, float, str, int]:
    """Wall and CPU seconds of a command, its last stdout line and its peak RSS (bytes: of
    the process or of one of its workers)."""
    cpu0 = children_cpu()
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PEAK, *argv], capture_output=True,
                          text=True, check=False, timeout=3600)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed: {proc.stderr.strip()[-2000:]}")
    peak = [line for line in proc.stderr.splitlines() if line.startswith("peak-rss-kib")]
    return (wall, children_cpu() - cpu0, proc.stdout.strip().splitlines()[-1],
            int(peak[-1].split()[1]) * 1024)


def one_run(redis: RedisPool, tmp: Path, blocks: int, indexes: int, keep: int) -> dict[str, Any]:
    redis.flush_all()
    fill_direct(redis, blocks, True, 25, False, indexes=indexes, deletes=0.1)
    args = ["--vdisk", VDISK, *storage_args(redis.addresses)]
    restore = tlog_command("restore", *args, "-o", str(tmp / "image"), "--no-progress")
    before_restore, _, _, _ = timed(restore)
    memory_before = used_memory(redis)
    wall, cpu, line, rss = timed(tlog_command("compact", *args, "--keep-sequences", str(keep),
                                              "--no-progress"))
    memory_after = used_memory(redis)
    after_restore, _, after_line, _ = timed(restore)
    covered = (blocks - keep) * BLOCK
    return {"compact_seconds": round(wall, 3), "compact_cpu_s": round(cpu, 3),
            "compact_mb_per_s": round(covered / wall / 1e6, 1),
            "compact_peak_rss_mb": round(rss / 1e6, 1),
            "redis_mb_before": round(memory_before / 1e6, 1),
            "redis_mb_after": round(memory_after / 1e6, 1),
            "redis_kept_share": round(memory_after / memory_before, 3),
            "restore_seconds_before": round(before_restore, 3),
            "restore_seconds_after": round(after_restore, 3),
            "summary": line, "restore_after": after_line, "load_average": load_average()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=100_000)
    parser.add_argument("--indexes", type=int, default=20_000,
                        help="block indexes written over (the vdisk's size in blocks)")
    parser.add_argument("--keep", type=int, default=20_000, help="--keep-sequences")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs = []
    with RedisPool(6) as redis, scratch_dir("tlogbench-compact") as tmp:
        for run in range(args.runs):
            result = one_run(redis, tmp, args.blocks, args.indexes, args.keep)
            result["run"] = run
            emit(result)
            runs.append(result)
    keys = ["compact_seconds", "compact_cpu_s", "compact_mb_per_s", "compact_peak_rss_mb",
            "redis_mb_before", "redis_mb_after", "redis_kept_share", "restore_seconds_before",
            "restore_seconds_after"]
    summary = summarize(runs, keys)
    emit({"benchmark": "compact", "blocks": args.blocks, "indexes": args.indexes,
          "keep": args.keep, "runs": len(runs), "summary": summary, "machine": machine()})
    table(f"tlog compact of {args.blocks} blocks over {args.indexes} indexes to the last "
          f"{args.keep}, {len(runs)} runs", [(key, summary.get(key)) for key in keys])


if __name__ == "__main__":
    main()
