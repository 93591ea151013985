"""In-process timings of the stages of the hot path, for regression hunting.

Each figure is the median over --runs runs of the microseconds per operation: the ingest
side (frame decode, hash check, RecvOK, aggregation encode, seal, erasure code, a storage
write round to 6 local redis-server processes and to the in-memory storage) and the
restore side (erasure join, record hash, open, block hash check, parse, image write).
Prints one JSON object, then a short table on stderr.

    .venv/bin/python benchmarks/micro.py --runs 5
    .venv/bin/python benchmarks/micro.py --runs 1 --scale 0.1 --no-redis
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RedisPool, machine, scratch_dir  # noqa: E402
from tlog.allocator import tune_allocator  # noqa: E402
from tlog.protocol import ClientConnection, ServerConnection, wire
from tlog.read.player import FileBlockStorage  # noqa: E402
from tlog.record import layout  # noqa: E402
from tlog.record.aggregation import Keyring, V2Writer, check_blocks, open_v2
from tlog.record.erasure import ErasureCoder  # noqa: E402
from tlog.record.keying import blake2b_key, record_key
from tlog.storage import MemoryStorageServer, StorageServer, any_pool_factory  # noqa: E402

KEY = b"k" * 32
SCALE = 1.0


async def store_round(servers: list[StorageServer], hashes: list[bytes],
                      pieces: list[list[bytes]]) -> None:
    """One storage round as the flusher does it: piece i of every record to server i, and
    the hashes pushed on its last-hash list, all servers at once."""
    await asyncio.gather(*(server.store([(h, p[i]) for h, p in zip(hashes, pieces,
                                                                    strict=True)],
                                        b"last_hash_micro", hashes)
                           for i, server in enumerate(servers)))


def storage_timings(servers: list[StorageServer], record: bytes, coder: ErasureCoder,
                    runs: int, label: str) -> dict[str, float]:
    """Microseconds of a storage round of 1 and of 8 aggregations (one event loop)."""
    pieces = coder.encode(record)
    hashes8 = [bytes([i]) * 32 for i in range(8)]

    async def measure() -> dict[str, float]:
        async def rounds(count: int, hashes: list[bytes]) -> None:
            for _ in range(count):
                await store_round(servers, hashes, [pieces] * len(hashes))

        out = {}
        await rounds(3, hashes8)  # connect first
        for name, hashes, number in ((f"store_1_agg_{label}_us", hashes8[:1], 300),
                                     (f"store_8_aggs_{label}_us", hashes8, 100)):
            number = max(1, int(number * SCALE))
            samples = []
            for _ in range(runs):
                t0 = time.perf_counter()
                await rounds(number, hashes)
                samples.append((time.perf_counter() - t0) / number * 1e6)
            out[name] = round(statistics.median(samples), 2)
        for server in servers:
            await server.close()
        return out

    return asyncio.run(measure())


def timed(fn: Callable[[], object], number: int, runs: int) -> float:
    """Median over ``runs`` of the microseconds one call of ``fn`` takes (``number`` calls
    per run, scaled by --scale)."""
    number = max(1, int(number * SCALE))
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - t0) / number * 1e6)
    return round(statistics.median(samples), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--random-data", action="store_true")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of the default repetitions (0.1 for a quick look)")
    parser.add_argument("--no-redis", dest="redis", action="store_false",
                        help="skip the storage round to redis-server")
    args = parser.parse_args()
    global SCALE
    SCALE = args.scale
    tune_allocator()
    data = os.urandom(4096) if args.random_data else b"tlog" * 1024
    frames = [ClientConnection.send_block(s, s, 1, data) for s in range(1000)]
    stream = ClientConnection.send_handshake("vd", 0) + b"".join(frames)

    def decode_1000() -> None:
        conn = ServerConnection()
        conn.receive_data(stream)

    blocks = [e for e in ServerConnection().receive_data(stream) if isinstance(e, wire.Block)][:25]
    writer = V2Writer(KEY, "vd")
    plain = layout.encode_aggregation("tlog", 1, "vd", bytes(32), blocks)
    sealed = writer.seal(bytes(32), blocks)
    coder = ErasureCoder(4, 2)
    pieces = coder.encode(sealed.record)
    keyring = Keyring.of(KEY)
    results: dict[str, Any] = {
        "frame_decode_us_per_block": round(timed(decode_1000, 20, args.runs) / 1000, 3),
        "block_hash_check_us": timed(lambda: blocks[0].hash_ok(), 5000, args.runs),
        "recv_ok_encode_us": timed(lambda: wire.encode_response(1, (7,)), 20000, args.runs),
        "aggregation_encode_us_per_25": timed(
            lambda: layout.encode_aggregation("tlog", 1, "vd", bytes(32), blocks),
            2000, args.runs),
        "seal_v2_us_per_25": timed(lambda: writer.seal(bytes(32), blocks),
                                   500, args.runs),
        "erasure_encode_us_per_25": timed(lambda: coder.encode(sealed.record), 1000, args.runs),
        "erasure_decode_us_per_25": timed(lambda: coder.decode(pieces), 1000, args.runs),
        "open_v2_us_per_25": timed(lambda: open_v2(sealed.record, keyring), 500, args.runs),
    }
    # The restore side, per aggregation of 25 blocks.
    record = sealed.record
    opened = open_v2(record, keyring)
    results.update({
        "erasure_join_us_per_25": timed(lambda: coder.decode(pieces[:4] + [None, None]), 1000,
                                        args.runs),
        # the key of the (v3) record: BLAKE3; and what it was before v3 (and is for v2 and
        # legacy records): BLAKE2b
        "record_hash_us_per_25": timed(lambda: record_key(record), 1000, args.runs),
        "record_hash_blake2b_us_per_25": timed(lambda: blake2b_key(record), 1000, args.runs),
        "open_v2_trusted_hash_us_per_25": timed(
            lambda: open_v2(record, keyring, sealed.hash, True), 500, args.runs),
        "block_hash_check_us_per_25": timed(lambda: check_blocks(opened), 500, args.runs),
        "parse_aggregation_us_per_25": timed(
            lambda: layout.parse_aggregation(memoryview(plain)[8:]), 2000, args.runs),
    })
    with scratch_dir("tlogbench-micro") as tmp:
        image = FileBlockStorage(tmp / "image")
        moved = [wire.Block(b.sequence, b.index + 25 * i, b.timestamp, b.operation, b.hash,
                            b.data) for i in range(64) for b in opened.blocks]
        chunks = [moved[i:i + 25] for i in range(0, len(moved), 25)]

        async def apply_all() -> float:
            number = max(1, int(500 * SCALE))
            samples = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                for i in range(number):
                    await image.apply(chunks[i % len(chunks)])
                samples.append((time.perf_counter() - t0) / number * 1e6)
            return round(statistics.median(samples), 2)

        results["image_apply_us_per_25"] = asyncio.run(apply_all())
        asyncio.run(image.close())
    results.update(storage_timings(
        [MemoryStorageServer() for _ in range(6)], record, coder, args.runs, "memory"))
    if args.redis:
        with RedisPool(6) as redis:
            factory = any_pool_factory(k=4, m=2, addresses=redis.addresses,
                                       allow_memory=False)
            results.update(storage_timings(
                factory.pool_for("micro").servers, record, coder, args.runs, "redis"))
    results["aggregation_bytes"] = len(plain)
    results["record_bytes"] = len(record)
    results["random_data"] = args.random_data
    print(json.dumps({"benchmark": "micro", **results, "machine": machine()}))
    for key, value in results.items():
        print(f"{key:32} {value}", file=sys.stderr)


if __name__ == "__main__":
    main()
