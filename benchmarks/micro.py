"""In-process timings of the stages of the hot path, for regression hunting.

Each figure is the median over --runs runs of the microseconds per operation.
Prints one JSON object, then a short table on stderr.

    .venv/bin/python benchmarks/micro.py --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tlog import wire  # noqa: E402
from tlog.aggregation import Keyring, V2Writer, open_v2  # noqa: E402
from tlog.allocator import tune_allocator  # noqa: E402
from tlog.erasure import ErasureCoder  # noqa: E402
from tlog.protocol import ClientConnection, ServerConnection  # noqa: E402

KEY = b"k" * 32


def timed(fn: Callable[[], object], number: int, runs: int) -> float:
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
    args = parser.parse_args()
    tune_allocator()
    data = os.urandom(4096) if args.random_data else b"tlog" * 1024
    frames = [ClientConnection.send_block(s, s, 1, data) for s in range(1000)]
    stream = ClientConnection.send_handshake("vd", 0) + b"".join(frames)

    def decode_1000() -> None:
        conn = ServerConnection()
        conn.receive_data(stream)

    blocks = ServerConnection().receive_data(stream)[1:26]
    writer = V2Writer(KEY, "vd")
    plain = wire.encode_aggregation("tlog", 1, "vd", bytes(32), blocks)  # type: ignore[arg-type]
    sealed = writer.seal(bytes(32), blocks)  # type: ignore[arg-type]
    coder = ErasureCoder(4, 2)
    pieces = coder.encode(sealed.record)
    keyring = Keyring.of(KEY)
    results = {
        "frame_decode_us_per_block": round(timed(decode_1000, 20, args.runs) / 1000, 3),
        "block_hash_check_us": timed(lambda: blocks[0].hash_ok(), 5000, args.runs),
        "recv_ok_encode_us": timed(lambda: wire.encode_response(1, (7,)), 20000, args.runs),
        "aggregation_encode_us_per_25": timed(
            lambda: wire.encode_aggregation("tlog", 1, "vd", bytes(32), blocks),  # type: ignore[arg-type]
            2000, args.runs),
        "seal_v2_us_per_25": timed(lambda: writer.seal(bytes(32), blocks),  # type: ignore[arg-type]
                                   500, args.runs),
        "erasure_encode_us_per_25": timed(lambda: coder.encode(sealed.record), 1000, args.runs),
        "erasure_decode_us_per_25": timed(lambda: coder.decode(pieces), 1000, args.runs),
        "open_v2_us_per_25": timed(lambda: open_v2(sealed.record, keyring), 500, args.runs),
        "aggregation_bytes": len(plain),
        "record_bytes": len(sealed.record),
    }
    print(json.dumps(results))
    for key, value in results.items():
        print(f"{key:32} {value}", file=sys.stderr)


if __name__ == "__main__":
    main()
