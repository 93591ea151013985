"""Memory: the server's RSS with many idle vdisks, and under an out-of-order flood.

1. **Idle vdisks**: ``--vdisks`` connections (default 1,000), each handshaking its own
   vdisk and then sending nothing. The server's RSS is read from /proc before, once all are
   connected, and after they closed.
2. **Flood**: one client sends sequences ``1 .. --flood-blocks`` of a vdisk whose first
   sequence 0 never comes, as fast as the server reads them: none can be flushed, so the
   server must either buffer them or refuse them (tlogserver answers RecvFailed beyond its
   ordering window, ``--max-buffered-blocks`` / ``--max-buffered-bytes``). RSS is sampled
   every 100 ms while the flood lasts, then sequence 0 is sent and RSS is sampled while the
   buffered blocks drain to storage.

Both against a tlogserver with 6 local redis-server processes (k=4, m=2). Prints one JSON
object per part, then a table on stderr.

    .venv/bin/python benchmarks/memory.py
    .venv/bin/python benchmarks/memory.py --vdisks 100 --flood-blocks 20000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RedisPool,
    TlogServer,
    emit,
    machine,
    storage_args,
    table,
)
from tlog.protocol import BlockResponse, ClientConnection, HandshakeResponse  # noqa: E402
from tlog.protocol.status import BlockStatus  # noqa: E402

MIB = 1024 * 1024


def raise_fd_limit(need: int) -> None:
    """Allow this process (and the server it starts) ``need`` open files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


def handshake(address: str, vdisk: str, first_sequence: int = 0) -> socket.socket:
    """A connection that completed its handshake for ``vdisk``."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(ClientConnection.send_handshake(vdisk, first_sequence))
    conn = ClientConnection()
    while True:
        data = sock.recv(4096)
        if not data:
            raise RuntimeError(f"server closed the handshake of {vdisk}")
        for event in conn.receive_data(data):
            if isinstance(event, HandshakeResponse):
                return sock


def idle_vdisks(redis: RedisPool, count: int, server_args: list[str]) -> dict[str, Any]:
    """RSS with ``count`` connected idle vdisks."""
    raise_fd_limit(count + 256)
    with TlogServer(*storage_args(redis.addresses), *server_args) as server:
        time.sleep(0.5)
        before = server.rss()
        socks = []
        started = time.perf_counter()
        try:
            for i in range(count):
                socks.append(handshake(server.address, f"idle-{i}"))
            connect_seconds = time.perf_counter() - started
            time.sleep(1.0)
            connected = server.rss()
        finally:
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.close()
        time.sleep(2.0)
        after = server.rss()
    return {"benchmark": "memory", "part": "idle_vdisks", "vdisks": count,
            "rss_start_mib": round(before / MIB, 1), "rss_connected_mib": round(connected / MIB, 1),
            "rss_per_vdisk_kib": round((connected - before) / count / 1024, 1),
            "rss_after_close_mib": round(after / MIB, 1),
            "connect_seconds": round(connect_seconds, 2)}


def flood(redis: RedisPool, blocks: int, server_args: list[str]) -> dict[str, Any]:
    """RSS over time while sequences 1.. arrive without 0, then while they drain."""
    data = os.urandom(4096)
    now = time.time_ns()
    with TlogServer(*storage_args(redis.addresses), *server_args) as server:
        time.sleep(0.5)
        sock = handshake(server.address, "flood", 0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        conn = ClientConnection()
        counts = {"recv_ok": 0, "recv_failed": 0, "flush_ok": 0, "other": 0}
        highest = [0]  # highest sequence answered RecvOK
        samples: list[tuple[float, float]] = []
        started = time.perf_counter()
        next_sample = started
        sent = 1
        pending = b""
        drained_at: float | None = None
        zero_sent_at: float | None = None

        def sample() -> None:
            nonlocal next_sample
            now_s = time.perf_counter()
            if now_s >= next_sample:
                samples.append((round(now_s - started, 2), round(server.rss() / MIB, 1)))
                next_sample = now_s + 0.1

        def read() -> None:
            try:
                chunk = sock.recv(1 << 20)
            except BlockingIOError:
                return
            if not chunk:
                raise RuntimeError("server closed the flood connection")
            for event in conn.receive_data(chunk):
                if not isinstance(event, BlockResponse):
                    counts["other"] += 1
                elif event.status == BlockStatus.RECV_OK:
                    counts["recv_ok"] += len(event.sequences)
                    highest[0] = max(highest[0], *event.sequences)
                elif event.status == BlockStatus.RECV_FAILED:
                    counts["recv_failed"] += len(event.sequences)
                elif event.status == BlockStatus.FLUSH_OK:
                    counts["flush_ok"] += len(event.sequences)
                else:
                    counts["other"] += 1

        while sent <= blocks or pending:
            if not pending:
                last = min(sent + 64, blocks + 1)
                pending = b"".join(ClientConnection.send_block(seq, seq, now, data)
                                   for seq in range(sent, last))
                sent = last
            with contextlib.suppress(BlockingIOError):
                pending = pending[sock.send(pending):]
            read()
            sample()
        flood_seconds = time.perf_counter() - started
        peak_flood = max((rss for _, rss in samples), default=0.0)
        # Sequence 0 arrives: everything the server kept can be flushed now.
        zero_sent_at = time.perf_counter()
        sock.setblocking(True)
        sock.sendall(ClientConnection.send_block(0, 0, now, data))
        # flush the last, partial aggregation too (not after --flush-time)
        sock.sendall(ClientConnection.send_force_flush(highest[0]))
        sock.setblocking(False)
        deadline = time.perf_counter() + 120
        while time.perf_counter() < deadline:
            read()
            sample()
            if counts["flush_ok"] >= counts["recv_ok"] + 1:  # sequence 0 included
                drained_at = time.perf_counter()
                break
            time.sleep(0.001)
        sock.close()
        time.sleep(0.5)
        samples.append((round(time.perf_counter() - started, 2), round(server.rss() / MIB, 1)))
    return {"benchmark": "memory", "part": "flood", "blocks": blocks,
            "flood_seconds": round(flood_seconds, 2),
            "drain_seconds": round(drained_at - zero_sent_at, 2) if drained_at else None,
            "rss_peak_flood_mib": peak_flood,
            "rss_peak_mib": max(rss for _, rss in samples),
            "rss_end_mib": samples[-1][1], **counts,
            "rss_samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vdisks", type=int, default=1000)
    parser.add_argument("--flood-blocks", type=int, default=200_000)
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra tlogserver argument, repeatable")
    args = parser.parse_args()
    with RedisPool(6) as redis:
        idle = idle_vdisks(redis, args.vdisks, args.server_arg)
        emit(idle)
        flooded = flood(redis, args.flood_blocks, args.server_arg)
        emit(flooded)
    emit({"benchmark": "memory", "machine": machine()})
    table(f"server RSS, {args.vdisks} idle vdisks (MiB)", [
        ("at start", idle["rss_start_mib"]), ("all connected", idle["rss_connected_mib"]),
        ("per vdisk (KiB)", idle["rss_per_vdisk_kib"]),
        ("after they closed", idle["rss_after_close_mib"])])
    table(f"server RSS, out-of-order flood of {args.flood_blocks} blocks (MiB)", [
        ("peak while flooded", flooded["rss_peak_flood_mib"]),
        ("peak (drain included)", flooded["rss_peak_mib"]), ("at end", flooded["rss_end_mib"]),
        ("RecvOK", flooded["recv_ok"]), ("RecvFailed", flooded["recv_failed"]),
        ("FlushOK", flooded["flush_ok"]), ("flood seconds", flooded["flood_seconds"]),
        ("drain seconds", flooded["drain_seconds"])])


if __name__ == "__main__":
    main()
