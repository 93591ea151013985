"""Restore: `tlog restore` of a logged vdisk into a new image file, in MB/s of block data.

Logs ``--gib`` GiB of 4 KiB blocks into 6 local redis-server processes (k=4, m=2), then
runs ``tlog restore -o IMAGE`` ``--runs`` times, each into a new file after an ``os.sync()``
(the previous image's writeback must not land in the next run). Two figures per run:

- ``command_mb_per_s``: block data over the wall time of the whole command (interpreter
  start and imports included: what a user waits for);
- ``reported_mb_per_s``: what the restore itself reports (walk back, fetch, checks, writes).

The log is written either the real way, ``--fill send`` (``tlog send`` -> ``tlogserver``,
sequence i at index i), or ``--fill direct``: sealed and stored in process by the library's
own writer, which is faster to set up and can scatter the blocks over the image
(``--scatter``: random indexes over 4x the blocks, the worst case for the writes).

    .venv/bin/python benchmarks/restore.py --gib 1 --runs 3
    .venv/bin/python benchmarks/restore.py --fill direct --scatter --gib 0.25
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    KEY,
    RedisPool,
    TlogServer,
    busy_seconds,
    children_cpu,
    emit,
    load_average,
    machine,
    run_json,
    scratch_dir,
    storage_args,
    summarize,
    table,
    tlog_command,
)

BLOCK = 4096
VDISK = "bench-restore"


def fill_send(redis: RedisPool, blocks: int, random_data: bool, flush_size: int) -> None:
    """Log the blocks through a real tlogserver with `tlog send`."""
    with TlogServer(*storage_args(redis.addresses), "--flush-size", str(flush_size)) as server:
        args = ["send", "--server", server.address, "--vdisk", VDISK, "--blocks", str(blocks)]
        if random_data:
            args.append("--random-data")
        run_json(tlog_command(*args), timeout=3600)


async def _fill_direct(addresses: list[str], blocks: int, random_data: bool, flush_size: int,
                       scatter: bool, indexes: int = 0, deletes: float = 0.0,
                       vdisk: str = VDISK) -> None:
    from tlog.protocol.wire import Block
    from tlog.record.aggregation import ZERO_HASH, V2Writer
    from tlog.record.erasure import ErasureCoder
    from tlog.storage import any_pool_factory, last_hash_key

    factory = any_pool_factory(k=4, m=2, addresses=addresses, allow_memory=False)
    pool = factory.pool_for(vdisk)
    writer = V2Writer(KEY.encode(), vdisk)
    coder = ErasureCoder(4, 2)
    rng = random.Random(1)
    pool_data = [rng.randbytes(BLOCK) if random_data else
                 (i.to_bytes(8, "big") + b"tlog bench" * 409)[:BLOCK] for i in range(1024)]
    hashes = [hashlib.blake2b(d, digest_size=32).digest() for d in pool_data]
    empty = hashlib.blake2b(b"", digest_size=32).digest()
    list_key = last_hash_key(vdisk)
    prev = ZERO_HASH
    now = time.time_ns()
    pending: list[tuple[bytes, list[bytes]]] = []

    async def store() -> None:
        keys = [h for h, _ in pending]
        await asyncio.gather(*(server.store([(h, p[i]) for h, p in pending], list_key, keys)
                               for i, server in enumerate(pool.servers)))
        pending.clear()

    try:
        for first in range(0, blocks, flush_size):
            agg = []
            for seq in range(first, min(first + flush_size, blocks)):
                j = seq % len(pool_data)
                index = (rng.randrange(indexes or blocks * 4) if scatter or indexes
                         else seq)
                if deletes and rng.random() < deletes:
                    agg.append(Block(seq, index, now + seq, 2, empty, b""))
                    continue
                agg.append(Block(seq, index, now + seq, 1, hashes[j], pool_data[j]))
            sealed = writer.seal(prev, agg)
            prev = sealed.hash
            pending.append((sealed.hash, coder.encode(sealed.record)))
            if len(pending) >= 64:
                await store()
        if pending:
            await store()
    finally:
        await factory.close()


def fill_direct(redis: RedisPool, blocks: int, random_data: bool, flush_size: int,
                scatter: bool, indexes: int = 0, deletes: float = 0.0,
                vdisk: str = VDISK) -> None:
    """Seal and store the chain in process (the library's writer, as tlogserver's);
    ``indexes``: write over that many block indexes at random, ``deletes`` of them deletes."""
    asyncio.run(_fill_direct(redis.addresses, blocks, random_data, flush_size, scatter,
                             indexes, deletes, vdisk))


def one_restore(redis: RedisPool, image: Path, data_bytes: int,
                extra: list[str]) -> dict[str, Any]:
    """Run `tlog restore` once into a new ``image``; its figures."""
    import subprocess

    if image.exists():
        image.unlink()
    os.sync()
    cmd = tlog_command("restore", "--vdisk", VDISK, *storage_args(redis.addresses), "-o",
                       str(image), "--no-progress", *extra)
    cpu0, redis0, busy0 = children_cpu(), redis.cpu_seconds(), busy_seconds()
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    cpu, redis_cpu = children_cpu() - cpu0, redis.cpu_seconds() - redis0
    others = busy_seconds() - busy0 - cpu - redis_cpu
    if proc.returncode != 0:
        raise RuntimeError(f"tlog restore failed: {proc.stderr.strip()[-2000:]}")
    summary = proc.stdout.strip().splitlines()[-1]
    reported = float(summary.rsplit("(", 1)[1].split()[0])
    seconds = float(summary.split(" in ", 1)[1].split()[0]) if " in " in summary else 0.0
    return {"seconds": round(wall, 3), "restore_seconds": seconds,
            "command_mb_per_s": round(data_bytes / wall / 1e6, 1),
            "reported_mb_per_s": reported,
            "restore_cpu_s": round(cpu, 3), "redis_cpu_s": round(redis_cpu, 3),
            "image_bytes": image.stat().st_size, "load_average": load_average(),
            # CPU seconds other processes took during the run (noise), per second of it
            "others_cpu_share": round(max(0.0, others) / wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="GiB of block data to log")
    parser.add_argument("--blocks", type=int, default=0, help="blocks to log (overrides --gib)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--flush-size", type=int, default=25)
    parser.add_argument("--compressible", action="store_true",
                        help="compressible blocks (default: random, incompressible)")
    parser.add_argument("--fill", choices=("send", "direct"), default="send")
    parser.add_argument("--scatter", action="store_true",
                        help="--fill direct: random block indexes instead of sequential")
    parser.add_argument("--restore-arg", action="append", default=[], metavar="ARG",
                        help="extra `tlog restore` argument, repeatable")
    args = parser.parse_args()
    blocks = args.blocks or int(args.gib * 2**30 // BLOCK)
    random_data = not args.compressible
    with RedisPool(6) as redis, scratch_dir("tlogbench-restore") as tmp:
        started = time.perf_counter()
        if args.fill == "send":
            fill_send(redis, blocks, random_data, args.flush_size)
        else:
            fill_direct(redis, blocks, random_data, args.flush_size, args.scatter)
        fill_seconds = time.perf_counter() - started
        data_bytes = blocks * BLOCK
        runs = []
        for run in range(args.runs):
            result = one_restore(redis, tmp / "image", data_bytes, args.restore_arg)
            result["run"] = run
            emit(result)
            runs.append(result)
    summary = summarize(runs, ["command_mb_per_s", "reported_mb_per_s", "seconds",
                               "restore_cpu_s", "redis_cpu_s"])
    emit({"benchmark": "restore", "blocks": blocks, "data_mb": round(data_bytes / 1e6, 1),
          "random_data": random_data, "fill": args.fill, "scatter": args.scatter,
          "flush_size": args.flush_size, "fill_seconds": round(fill_seconds, 1),
          "runs": len(runs), "summary": summary, "machine": machine()})
    table(f"tlog restore of {blocks} blocks ({data_bytes / 1e6:.0f} MB, "
          f"{'random' if random_data else 'compressible'}, fill {args.fill}), {len(runs)} runs",
          [("command MB/s", summary.get("command_mb_per_s")),
           ("reported MB/s", summary.get("reported_mb_per_s")),
           ("wall seconds", summary.get("seconds")),
           ("restore CPU s", summary.get("restore_cpu_s")),
           ("redis CPU s", summary.get("redis_cpu_s"))])


if __name__ == "__main__":
    main()
