"""Ingest end to end: `tlog send` -> `tlogserver` -> 6 local redis-server (k=4, m=2).

For every combination of ``--flush-sizes`` and data kind (compressible, random), runs
``tlog send`` ``--runs`` times as fast as it goes, then ``--runs`` times paced at half the
median rate it reached (``tlog send --rate``), each run against a fresh tlogserver and an
emptied storage. Figures per run:

- ``blocks_per_second``, ``mb_per_second``: blocks sent until the last FlushOK;
- ``server_cpu_us_per_block``: the server's user + system CPU (from /proc) over the run;
- ``client_cpu_us_per_block``: `tlog send`'s own CPU over its sending loop;
- ``redis_cpu_us_per_block``: the six redis-server processes together;
- ``recv_ok_p50_ms`` ... ``flush_ok_p99_ms``: latency from handing a block to the client
  until its RecvOK / FlushOK arrived.

Prints one JSON object per run, one summary object per setting (median, min, max), and a
table on stderr.

    .venv/bin/python benchmarks/ingest.py --runs 3
    .venv/bin/python benchmarks/ingest.py --flush-sizes 25 --data compressible --no-half
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RedisPool,
    TlogServer,
    busy_seconds,
    children_cpu,
    emit,
    load_average,
    machine,
    run_json,
    storage_args,
    summarize,
    table,
    tlog_command,
)

FIGURES = ["blocks_per_second", "mb_per_second", "server_cpu_us_per_block",
           "client_cpu_us_per_block", "redis_cpu_us_per_block", "recv_ok_p50_ms",
           "recv_ok_p99_ms", "flush_ok_p50_ms", "flush_ok_p99_ms", "resends"]


def own_cpu() -> float:
    """CPU seconds of this process so far."""
    return time.process_time()


def one_run(redis: RedisPool, blocks: int, flush_size: int, random_data: bool, rate: float,
            server_args: list[str]) -> dict[str, Any]:
    """One `tlog send` against a fresh server; the figures of the run."""
    redis.flush_all()
    with TlogServer(*storage_args(redis.addresses), "--flush-size", str(flush_size),
                    *server_args) as server:
        args = ["send", "--server", server.address, "--vdisk", "bench-ingest",
                "--blocks", str(blocks)]
        if random_data:
            args.append("--random-data")
        if rate > 0:
            args += ["--rate", f"{rate:.0f}"]
        cpu0, redis0 = server.cpu_seconds(), redis.cpu_seconds()
        busy0, client0, own0 = busy_seconds(), children_cpu(), own_cpu()
        started = time.perf_counter()
        sent = run_json(tlog_command(*args), timeout=3600)
        wall = time.perf_counter() - started
        cpu, redis_cpu = server.cpu_seconds() - cpu0, redis.cpu_seconds() - redis0
        others = (busy_seconds() - busy0) - cpu - redis_cpu - (children_cpu() - client0) - (
            own_cpu() - own0)
    return {
        "flush_size": flush_size, "random_data": random_data, "rate": round(rate) or None,
        "blocks": blocks, "seconds": sent["seconds"],
        "blocks_per_second": sent["blocks_per_second"], "mb_per_second": sent["mb_per_second"],
        "server_cpu_us_per_block": round(cpu / blocks * 1e6, 2),
        "client_cpu_us_per_block": sent["cpu_us_per_block"],
        "redis_cpu_us_per_block": round(redis_cpu / blocks * 1e6, 2),
        "recv_ok_p50_ms": sent["recv_ok_p50_ms"], "recv_ok_p99_ms": sent["recv_ok_p99_ms"],
        "flush_ok_p50_ms": sent["flush_ok_p50_ms"], "flush_ok_p99_ms": sent["flush_ok_p99_ms"],
        "resends": sent["resends"], "load_average": load_average(),
        # CPU seconds other processes took during the run (noise), per second of it
        "others_cpu_share": round(max(0.0, others) / wall, 2),
    }


def setting(redis: RedisPool, args: argparse.Namespace, flush_size: int,
            random_data: bool) -> list[dict[str, Any]]:
    """Full speed, then half of it; a summary object per speed."""
    summaries = []
    full: list[dict[str, Any]] = []
    for run in range(args.runs):
        result = one_run(redis, args.blocks, flush_size, random_data, 0.0, args.server_arg)
        emit({"benchmark": "ingest", "speed": "full", "run": run, **result})
        full.append(result)
    speeds = [("full", full, 0.0)]
    if args.half:
        rate = statistics.median(r["blocks_per_second"] for r in full) / 2
        half = []
        for run in range(args.runs):
            result = one_run(redis, args.blocks, flush_size, random_data, rate,
                             args.server_arg)
            emit({"benchmark": "ingest", "speed": "half", "run": run, **result})
            half.append(result)
        speeds.append(("half", half, rate))
    for speed, runs, rate in speeds:
        summary = {"benchmark": "ingest", "summary": True, "speed": speed,
                   "flush_size": flush_size, "random_data": random_data,
                   "rate": round(rate) or None, "blocks": args.blocks, "runs": len(runs),
                   "figures": summarize(runs, FIGURES)}
        emit(summary)
        summaries.append(summary)
    return summaries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=100_000, help="blocks per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--flush-sizes", default="25,250")
    parser.add_argument("--data", choices=("compressible", "random", "both"), default="both")
    parser.add_argument("--no-half", dest="half", action="store_false",
                        help="skip the runs at half the full rate")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra tlogserver argument, repeatable")
    args = parser.parse_args()
    kinds = {"compressible": [False], "random": [True], "both": [False, True]}[args.data]
    summaries = []
    with RedisPool(6) as redis:
        for flush_size in (int(x) for x in args.flush_sizes.split(",")):
            for random_data in kinds:
                summaries += setting(redis, args, flush_size, random_data)
    emit({"benchmark": "ingest", "machine": machine()})
    for s in summaries:
        f = s["figures"]
        title = (f"ingest, flush-size {s['flush_size']}, "
                 f"{'random' if s['random_data'] else 'compressible'} data, {s['speed']} speed"
                 + (f" ({s['rate']} blocks/s)" if s["rate"] else "") + f", {s['runs']} runs")
        table(title, [(name, f.get(name)) for name in FIGURES])


if __name__ == "__main__":
    main()
