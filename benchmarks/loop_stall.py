"""Event-loop stalls of tlogserver: how late a 1 ms timer on the server's loop fires while
it flushes large aggregations and while it compacts a log by its retention policy.

Everything of a tlogserver runs on one event loop, so a piece of CPU work that holds it
delays every connection's RecvOK and FlushOK by as much. The server runs in this process
(`tlogserver.server.TlogServer`, under uvloop as the daemon does) with its lateness probe
(`tlogserver.looplag`) waking every millisecond instead of every 100 ms, and 6 local
redis-server processes (k=4, m=2) behind it. Per run, three cases:

- ``flush``: ``tlog send`` (a subprocess) writes ``--flush-blocks`` random 64 KiB blocks
  with flush-size 250 (aggregations of 16 MB), paced at ``--flush-rate`` blocks/s (about
  half of what this 2-core machine takes at full speed: at full speed client, server and
  storage keep both cores busy, and any process waits for one);
- ``compact_64k``: a server with ``--retention-keep-sequences KEEP`` is handed that log (a
  client's handshake opens the vdisk) and compacts it: checkpoint parts of 256 blocks of
  64 KiB are 16 MB each;
- ``compact_4k``: the same over a log of ``--compact-blocks`` 4 KiB blocks (flush-size 25,
  random data, written over ``--indexes`` indexes, 10 % deletes; sealed in process).

Figures per case: ``max_ms`` and ``p99_ms`` of the timer's lateness over the case;
``cpu_max_ms`` and ``cpu_p99_ms``, the part of each late wake-up the loop's thread spent
running (its CPU time: work that held the loop, not a wait for a core); ``control_max_ms``
and ``control_p99_ms``, the lateness of the same timer in an idle process meanwhile (what
the machine's scheduling alone costs); the number of wake-ups, the case's seconds, and MB/s
for ``flush``. One JSON object per run, then a summary (median, min, max of each figure),
and a table on stderr.

    .venv/bin/python benchmarks/loop_stall.py --runs 3
    .venv/bin/python benchmarks/loop_stall.py --cases flush --runs 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    KEY,
    RedisPool,
    emit,
    load_average,
    machine,
    summarize,
    table,
    tlog_command,
)
from benchmarks.restore import fill_direct  # noqa: E402

CASES = ("flush", "compact_64k", "compact_4k")
BIG_BLOCK = 64 * 1024
VDISK_64K = "bench-stall-64k"
VDISK_4K = "bench-stall-4k"
FIGURES = ["max_ms", "p99_ms", "cpu_max_ms", "cpu_p99_ms", "control_max_ms", "control_p99_ms",
           "wakeups", "seconds", "mb_per_second"]


#: A process that does nothing but the same 1 ms timer, until its stdin closes: how late it
#: fires is what the machine's scheduling alone costs (the floor under the server's figure).
_CONTROL = """
import json, sys, time, uvloop, asyncio
async def main():
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(0, lambda: sys.stdin.buffer.read1(1 << 16) or done.done()
                    or done.set_result(None))
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    samples = []
    while not done.done():
        expected = time.perf_counter() + 0.001
        await asyncio.sleep(0.001)
        samples.append(max(0.0, time.perf_counter() - expected))
    return samples
print(json.dumps(uvloop.run(main())))
"""


def percentiles(samples: list[float]) -> tuple[float, float]:
    """(max, p99) of lateness samples, in milliseconds."""
    ordered = sorted(samples) or [0.0]
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return round(ordered[-1] * 1e3, 2), round(p99 * 1e3, 2)


class Control:
    """The idle control process of `_CONTROL`, for the length of one case."""

    async def __aenter__(self) -> Control:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CONTROL, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)
        assert self.proc.stdout is not None
        await self.proc.stdout.readline()
        self.samples: list[float] = []
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        out, _ = await self.proc.communicate()
        if exc[0] is None:
            self.samples = json.loads(out)


class Probe:
    """The server's lateness probe (`tlogserver.looplag`) every millisecond, keeping every
    sample, and beside it the same timer reading the loop thread's CPU time: of a late
    wake-up, the part the loop spent working (``cpu``), not waiting for a core."""

    def __init__(self) -> None:
        from tlogserver.looplag import LoopLagProbe
        from tlogserver.stats import LAG_BUCKETS, Histogram

        self.samples: list[float] = []
        self.cpu: list[float] = []
        self.probe = LoopLagProbe(Histogram(LAG_BUCKETS), interval=0.001,
                                  samples=self.samples)
        self._task: asyncio.Task[None] | None = None
        self.started = 0.0
        self.seconds = 0.0

    def start(self) -> None:
        self.started = time.perf_counter()
        self.probe.start()
        self._task = asyncio.get_running_loop().create_task(self._cpu())

    async def _cpu(self) -> None:
        while True:
            wall, cpu = time.perf_counter(), time.thread_time()
            await asyncio.sleep(0.001)
            late = time.perf_counter() - wall - 0.001
            self.cpu.append(max(0.0, min(late, time.thread_time() - cpu)))

    async def stop(self) -> None:
        self.seconds = time.perf_counter() - self.started
        await self.probe.stop()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def figures(self, control: Control) -> dict[str, Any]:
        top, p99 = percentiles(self.samples)
        cpu_top, cpu_p99 = percentiles(self.cpu)
        control_top, control_p99 = percentiles(control.samples)
        return {"max_ms": top, "p99_ms": p99, "cpu_max_ms": cpu_top, "cpu_p99_ms": cpu_p99,
                "control_max_ms": control_top, "control_p99_ms": control_p99,
                "wakeups": len(self.samples), "seconds": round(self.seconds, 3)}


async def _server(addresses: list[str], **options: Any) -> Any:
    from tlogserver.config import ServerConfig
    from tlogserver.main import freeze_heap
    from tlogserver.server import TlogServer

    config = ServerConfig(address="127.0.0.1:0", storage_addresses=list(addresses),
                          priv_key=KEY, flush_time=30.0, log_level="warning",
                          **options).validate()
    server = TlogServer(config)
    await server.start()
    freeze_heap()  # as the daemon does once started
    return server


async def flush_case(addresses: list[str], blocks: int, flush_size: int,
                     rate: int) -> dict[str, Any]:
    """``tlog send`` of random 64 KiB blocks, ``rate`` blocks/s (0: as fast as it goes)."""
    server = await _server(addresses, flush_size=flush_size, block_size=BIG_BLOCK)
    probe = Probe()
    try:
        host, port = server.sockets[0].getsockname()[:2]
        async with Control() as control:
            probe.start()
            proc = await asyncio.create_subprocess_exec(
                *tlog_command("send", "--server", f"{host}:{port}", "--vdisk", VDISK_64K,
                              "--blocks", str(blocks), "--block-size", str(BIG_BLOCK),
                              "--random-data", "--rate", str(rate)),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
            await probe.stop()
        if proc.returncode != 0:
            raise RuntimeError(f"tlog send failed: {err.decode()[-2000:]}")
        sent = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        await server.shutdown()
    return {**probe.figures(control), "mb_per_second": sent["mb_per_second"]}


async def compact_case(addresses: list[str], vdisk: str, block_size: int,
                       keep: int) -> dict[str, Any]:
    """Open ``vdisk`` on a server whose policy keeps ``keep`` sequences; the loop's lateness
    until its compaction is done and the log measured again."""
    from tlog.protocol import ClientConnection

    server = await _server(addresses, block_size=block_size, retention_keep_sequences=keep,
                           retention_interval="1h")
    probe = Probe()
    writer = None
    try:
        host, port = server.sockets[0].getsockname()[:2]
        async with Control() as control:
            probe.start()
            reader, writer = await asyncio.open_connection(host, port)
            # (continuing after the stored log: a client resending from 0 would have the
            # server read the log back while it is compacted)
            writer.write(ClientConnection.send_handshake(vdisk, 0, continue_sequence=True))
            await asyncio.wait_for(reader.read(4096), 30)  # the answer: the vdisk is open
            while True:
                entry = server.keeper.logs.get(vdisk)
                if server.stats.compactions and entry is not None and entry.since is None:
                    break  # compacted (or tried) and measured after
                if probe.started + 3600 < time.perf_counter():
                    raise RuntimeError("no compaction within an hour")
                await asyncio.sleep(0.05)
            await probe.stop()
        if server.stats.compactions.get("ok") != 1:
            raise RuntimeError(f"the compaction did not run: {server.stats.compactions}")
    finally:
        if writer is not None:
            writer.close()
        await server.shutdown()
    return probe.figures(control)


def one_run(redis: RedisPool, args: argparse.Namespace) -> dict[str, Any]:
    """The cases asked for, each server on a loop of its own (uvloop, as the daemon's)."""
    import uvloop

    out: dict[str, Any] = {}
    if "flush" in args.cases or "compact_64k" in args.cases:
        redis.flush_all()
        flushed = uvloop.run(flush_case(redis.addresses, args.flush_blocks, args.flush_size,
                                        args.flush_rate))
        if "flush" in args.cases:
            out["flush"] = flushed
        if "compact_64k" in args.cases:
            out["compact_64k"] = uvloop.run(compact_case(
                redis.addresses, VDISK_64K, BIG_BLOCK, args.flush_blocks // 5))
    if "compact_4k" in args.cases:
        redis.flush_all()
        fill_direct(redis, args.compact_blocks, True, 25, False, indexes=args.indexes,
                    deletes=0.1, vdisk=VDISK_4K)
        out["compact_4k"] = uvloop.run(compact_case(redis.addresses, VDISK_4K, 4096,
                                                    args.compact_blocks // 5))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--flush-blocks", type=int, default=4000,
                        help="64 KiB blocks sent (the compact_64k log)")
    parser.add_argument("--flush-size", type=int, default=250,
                        help="flush-size of the 64 KiB-block vdisk (250: 16 MB aggregations)")
    parser.add_argument("--flush-rate", type=int, default=1000,
                        help="64 KiB blocks per second tlog send is paced at (0: as fast as it "
                             "goes, which keeps both cores of a small machine busy)")
    parser.add_argument("--compact-blocks", type=int, default=50_000,
                        help="4 KiB blocks in the compact_4k log")
    parser.add_argument("--indexes", type=int, default=20_000,
                        help="block indexes the compact_4k log writes over")
    args = parser.parse_args()
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = set(args.cases) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {', '.join(sorted(unknown))}; cases: {', '.join(CASES)}")
    from tlog.allocator import tune_allocator

    tune_allocator()  # as the daemon does
    runs: list[dict[str, Any]] = []
    with RedisPool(6) as redis:
        for run in range(args.runs):
            result = one_run(redis, args)
            emit({"benchmark": "loop_stall", "run": run, **result,
                  "load_average": load_average()})
            runs.append(result)
    summary = {case: summarize([r[case] for r in runs], FIGURES) for case in args.cases}
    emit({"benchmark": "loop_stall", "summary": summary, "runs": len(runs),
          "flush_blocks": args.flush_blocks, "compact_blocks": args.compact_blocks,
          "machine": machine()})
    for case in args.cases:
        table(f"event-loop lateness, {case}, {len(runs)} runs",
              [(key, summary[case].get(key)) for key in FIGURES])


if __name__ == "__main__":
    main()
