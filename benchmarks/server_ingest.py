"""Server-side ingest: pre-encoded 4 KiB blocks over one socket into a tlogserver process.

Measures the server alone (the sender only writes prepared bytes and counts
FlushOKs): blocks/s and the server's CPU microseconds per block, read from
/proc. Starts its own redis-server processes (k+m of them) unless
--memory-storage is given. Prints one JSON object per run, then a summary.

    .venv/bin/python benchmarks/server_ingest.py --blocks 50000 --runs 3
    .venv/bin/python benchmarks/server_ingest.py --memory-storage \
        --server-arg=--metrics-address=127.0.0.1:0
    .venv/bin/python benchmarks/server_ingest.py --slave-sync   # + a standby kept in step

With --slave-sync the vdisk has a standby redis (tlogserver --with-slave-sync); a run ends
when the server answers WaitNbdSlaveSync (the standby holds every block), so the CPU per
block includes applying it, and ``standby_seconds`` is how long after the last FlushOK the
standby was in step.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    KEY,
    RedisPool,
    cpu_seconds,
    free_port,
    wait_listening,
)
from tlog.protocol import ClientConnection  # noqa: E402
from tlog.protocol.status import BlockStatus  # noqa: E402


def make_blocks(n: int, random_data: bool) -> list[bytes]:
    rng = os.urandom if random_data else (lambda size: b"tlog" * (size // 4))
    now = time.time_ns()
    return [ClientConnection.send_block(seq, seq, now, rng(4096)) for seq in range(n)]


def one_run(args: argparse.Namespace, frames: list[bytes], storage: list[str],
            standby: str | None = None) -> dict[str, float]:
    port = free_port()
    cmd = [sys.executable, "-m", "tlogserver", "--address", f"127.0.0.1:{port}",
           "--flush-size", str(args.flush_size)]
    if standby is not None:
        config = Path(tempfile.mkdtemp(prefix="tlogbench-cfg")) / "tlogserver.yaml"
        config.write_text(json.dumps({"vdisks": {f"bench{port}": {
            "slave_sync": True, "slave_server": standby}}}))  # JSON is YAML
        cmd += ["--config", str(config), "--with-slave-sync"]
    cmd += ["--storage-addresses", ",".join(storage), "--priv-key", KEY] if storage else [
        "--memory-storage"]
    cmd += args.server_arg
    server = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, time.monotonic() + 30)
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = ClientConnection()
        sock.sendall(ClientConnection.send_handshake(f"bench{port}", 0))
        flushed = 0
        want = len(frames)
        cpu0 = cpu_seconds(server.pid)
        t0 = time.perf_counter()
        batch = 1 if args.write_per_block else 64
        sent = 0
        sock.setblocking(False)
        pending = b""
        interval = 1.0 / args.rate if args.rate else 0.0
        while flushed < want:
            if sent < want and not pending:
                due = t0 + sent * interval
                now = time.perf_counter()
                if now < due:  # paced: wait for the next block's turn (answers meanwhile)
                    select.select([sock], [], [], due - now)
                else:
                    pending = b"".join(frames[sent:sent + batch])
                    sent = min(sent + batch, want)
            if pending:
                try:
                    n = sock.send(pending)
                    pending = pending[n:]
                except BlockingIOError:
                    pass
            if sent == want and not pending and flushed + args.flush_size > want:
                sock.setblocking(True)
                sock.sendall(ClientConnection.send_force_flush(want - 1))
                sock.setblocking(False)
                sent += 1  # only once
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                if sent >= want and not pending:
                    time.sleep(0.0005)
                continue
            if not data:
                raise RuntimeError("server closed the connection")
            for event in client.receive_data(data):
                if getattr(event, "status", None) == BlockStatus.FLUSH_OK:
                    flushed += len(event.sequences)  # type: ignore[union-attr]
        seconds = time.perf_counter() - t0
        standby_seconds = 0.0
        if standby is not None:
            sock.setblocking(True)
            sock.sendall(ClientConnection.send_wait_nbd_slave_sync())
            answered = None
            while answered is None:
                data = sock.recv(1 << 20)
                if not data:
                    raise RuntimeError("server closed the connection")
                for event in client.receive_data(data):
                    status = getattr(event, "status", None)
                    if status in (BlockStatus.WAIT_NBD_SLAVE_SYNC_RECEIVED,
                                  BlockStatus.WAIT_NBD_SLAVE_SYNC_FAILED):
                        answered = status
            if answered != BlockStatus.WAIT_NBD_SLAVE_SYNC_RECEIVED:
                raise RuntimeError("WaitNbdSlaveSync failed")
            standby_seconds = time.perf_counter() - t0 - seconds
        cpu = cpu_seconds(server.pid) - cpu0
        sock.close()
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    return {"blocks": want, "seconds": round(seconds, 3),
            "blocks_per_second": round(want / seconds),
            "mb_per_second": round(want * 4096 / seconds / 1e6, 1),
            "server_cpu_us_per_block": round(cpu / want * 1e6, 2),
            "standby_seconds": round(standby_seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--flush-size", type=int, default=25)
    parser.add_argument("--random-data", action="store_true")
    parser.add_argument("--rate", type=float, default=0.0, metavar="BLOCKS_PER_S",
                        help="pace the sender (0: as fast as it goes); 0-Disk's Go client "
                             "sends about 12,500 blocks/s here, one per write")
    parser.add_argument("--write-per-block", action="store_true",
                        help="one send() per block (TCP_NODELAY), as an NBD server writing "
                             "4 KiB at a time or 0-Disk's Go client does; default: 64 "
                             "blocks per send()")
    parser.add_argument("--memory-storage", action="store_true")
    parser.add_argument("--slave-sync", action="store_true",
                        help="give the vdisk a standby redis and wait until it is in step")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra tlogserver argument, repeatable "
                             "(--server-arg=--metrics-address=127.0.0.1:0)")
    args = parser.parse_args()
    frames = make_blocks(args.blocks, args.random_data)
    results = []
    with RedisPool(0 if args.memory_storage else 6) as redis, \
            RedisPool(1 if args.slave_sync else 0) as standby:
        for _ in range(args.runs):
            result = one_run(args, frames, redis.addresses,
                             standby.addresses[0] if args.slave_sync else None)
            print(json.dumps(result), flush=True)
            results.append(result)
    summary = {key: {"median": statistics.median(r[key] for r in results),
                     "min": min(r[key] for r in results), "max": max(r[key] for r in results)}
               for key in ("blocks_per_second", "server_cpu_us_per_block")}
    print(json.dumps({"summary": summary, "flush_size": args.flush_size,
                      "random_data": args.random_data, "server_args": args.server_arg,
                      "write_per_block": args.write_per_block, "rate": args.rate,
                      "slave_sync": args.slave_sync,
                      "storage": "memory" if args.memory_storage else "6 redis, k=4 m=2"}))


if __name__ == "__main__":
    main()
