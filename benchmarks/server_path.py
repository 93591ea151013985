"""The server's CPU per block in process, without sockets: what compiling can change.

One `TlogConnection` of a `TlogServer` on its embedded in-memory storage is fed canonical
4 KiB block messages (64 per read, as a busy socket delivers them) through
``get_buffer``/``buffer_updated``, and the event loop runs until the last block is flushed.
The figure is the process's CPU time per block (parse, hash check, window, RecvOK, aggregation,
compression, seal, erasure code, store): everything tlogserver does for a block except the
socket and Redis. ``--profile`` adds cProfile's top functions by own time, which is where the
microseconds go. Prints one JSON object per run, then a summary, as the other scripts do.

    .venv/bin/python benchmarks/server_path.py --blocks 50000 --runs 5
    TLOG_NO_EXTENSIONS=1 .venv/bin/python benchmarks/server_path.py --runs 5
    .venv/bin/python benchmarks/server_path.py --profile --runs 1
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tlog import compiled  # noqa: E402
from tlog.protocol import BlockStatus, ClientConnection, wire  # noqa: E402
from tlogserver.config import ServerConfig  # noqa: E402
from tlogserver.connection import TlogConnection  # noqa: E402
from tlogserver.server import TlogServer  # noqa: E402

READ = 64  # blocks per read


class Transport:
    """What the connection writes to: kept as bytes, parsed for the last FlushOK."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.done = asyncio.Event()
        self.last = -1
        self.reader = ClientConnection()
        self.own_cpu = 0.0

    def write(self, data: bytes) -> None:
        self.written += data

    def check(self) -> None:
        """Read what was written; its CPU time is the benchmark's, not the server's."""
        c0 = time.process_time()
        for event in self.reader.receive_data(bytes(self.written)):
            if isinstance(event, wire.BlockResponse):
                if event.status == BlockStatus.FLUSH_OK and self.last in event.sequences:
                    self.done.set()
        self.written.clear()
        self.own_cpu += time.process_time() - c0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def feed(conn: TlogConnection, data: bytes | memoryview) -> None:
    """Hand ``data`` to a connection as the event loop does: into its buffer, in pieces."""
    view = memoryview(data)
    while view:
        buf = conn.get_buffer(len(view))
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        view = view[n:]
        conn.buffer_updated(n)


async def one_run(blocks: int, flush_size: int, random_data: bool,
                  profile: cProfile.Profile | None) -> dict[str, float]:
    config = ServerConfig(address="127.0.0.1:0", memory_storage=True, flush_size=flush_size,
                          flush_time=600.0).validate()
    server = TlogServer(config)
    conn = TlogConnection(server)
    transport = Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    feed(conn, ClientConnection.send_handshake("bench", 0))
    while not transport.written:  # the handshake is answered by a task
        await asyncio.sleep(0.001)
    transport.check()

    datas = [os.urandom(4096) if random_data else (b"%08d" % i) * 512 for i in range(64)]
    reads = []
    for first in range(0, blocks, READ):
        reads.append(b"".join(
            ClientConnection.send_block(seq, seq, seq, datas[seq % 64])
            for seq in range(first, min(blocks, first + READ))))
    transport.last = blocks - 1

    if profile:
        profile.enable()
    transport.own_cpu = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    for i, chunk in enumerate(reads):
        feed(conn, chunk)
        if i % 16 == 15:
            transport.check()
        await asyncio.sleep(0)  # let the flusher run as the event loop would between reads
    while not transport.done.is_set():
        await asyncio.sleep(0.0005)
        transport.check()
    cpu = time.process_time() - c0 - transport.own_cpu
    wall = time.perf_counter() - t0
    if profile:
        profile.disable()
    conn.connection_lost(None)
    await server.shutdown()
    return {"cpu_us_per_block": round(cpu / blocks * 1e6, 3),
            "blocks_per_s": round(blocks / wall)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--flush-size", type=int, default=25)
    parser.add_argument("--random-data", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="print cProfile's top functions by own time on stderr")
    parser.add_argument("--uvloop", action="store_true", help="run under uvloop")
    args = parser.parse_args()

    profile = cProfile.Profile() if args.profile else None
    runs = []
    for _ in range(args.runs):
        if args.uvloop:
            import uvloop
            result = uvloop.run(one_run(args.blocks, args.flush_size, args.random_data, profile))
        else:
            result = asyncio.run(one_run(args.blocks, args.flush_size, args.random_data, profile))
        runs.append(result)
        print(json.dumps(result), flush=True)
    cpu = [r["cpu_us_per_block"] for r in runs]
    print(json.dumps({"summary": True, "modules": compiled.summary(),
                      "blocks": args.blocks, "flush_size": args.flush_size,
                      "random_data": args.random_data,
                      "cpu_us_per_block": {"median": statistics.median(cpu),
                                           "min": min(cpu), "max": max(cpu)}}))
    print(f"server path: {statistics.median(cpu):.2f} us of CPU per block "
          f"({min(cpu):.2f}-{max(cpu):.2f}); {compiled.summary()}", file=sys.stderr)
    if profile:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(30)
        print(out.getvalue(), file=sys.stderr)


if __name__ == "__main__":
    main()
