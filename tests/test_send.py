"""`tlog send` as a user runs it: a subprocess against real tlogservers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import pytest

from .serverproc import ServerProcess, pick_port, storage_args, stored_blocks

KEYS = {"blocks", "block_size", "random_data", "seconds", "blocks_per_second", "mb_per_second",
        "recv_ok_p50_ms", "recv_ok_p99_ms", "flush_ok_p50_ms", "flush_ok_p99_ms", "resends",
        "resent_on_reconnect", "reconnects", "cpu_seconds", "cpu_us_per_block", "server",
        "first_sequence", "epoch", "delete_ranges", "range_ops", "last_sequence"}


def tlog_send(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from tlog.cli import main; main()", "send",
                           *args], capture_output=True, text=True, timeout=timeout)


def result_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # exactly one JSON line
    result: dict[str, Any] = json.loads(lines[0])
    assert set(result) == KEYS
    return result


def test_send_reports_throughput_and_latencies(mem_server: ServerProcess) -> None:
    result = result_of(tlog_send("--server", mem_server.address, "--blocks", "3000"))
    assert result["blocks"] == 3000 and result["block_size"] == 4096
    assert result["random_data"] is False and result["server"] == mem_server.address
    assert result["seconds"] > 0 and result["blocks_per_second"] > 0
    assert result["mb_per_second"] == pytest.approx(
        result["blocks_per_second"] * 4096 / 1e6, rel=0.01)
    assert 0 < result["recv_ok_p50_ms"] <= result["recv_ok_p99_ms"]
    assert 0 < result["flush_ok_p50_ms"] <= result["flush_ok_p99_ms"]
    assert result["recv_ok_p50_ms"] <= result["flush_ok_p50_ms"]
    assert (result["resends"], result["reconnects"], result["resent_on_reconnect"]) == (0, 0, 0)
    assert result["cpu_us_per_block"] > 0


def test_send_stores_what_it_says(redis6: list[Any]) -> None:
    """Random data, another block size and first sequence: the chain holds exactly that."""
    addresses = [r.address for r in redis6]
    server = ServerProcess(*storage_args(addresses)).start()
    try:
        result = result_of(tlog_send("--server", server.address, "--vdisk", "sent",
                                     "--blocks", "600", "--block-size", "512",
                                     "--first-sequence", "100", "--random-data"))
    finally:
        server.kill()
    assert result["blocks"] == 600 and result["random_data"] is True
    blocks = asyncio.run(stored_blocks(addresses, "sent"))
    assert [b.sequence for b in blocks] == list(range(100, 700))
    assert all(b.index == b.sequence and len(b.data) == 512 for b in blocks)
    assert len({bytes(b.data) for b in blocks}) == 600  # random, not one repeated block


def test_send_logs_range_deletes(redis6: list[Any]) -> None:
    """--delete-range after the blocks: one entry each, with a server that takes them."""
    addresses = [r.address for r in redis6]
    server = ServerProcess(*storage_args(addresses)).start()
    try:
        result = result_of(tlog_send("--server", server.address, "--vdisk", "ranged",
                                     "--blocks", "50", "--delete-range", "10:20",
                                     "--delete-range", "0:1099511627776"))
        bad = tlog_send("--server", server.address, "--delete-range", "5:0")
        worse = tlog_send("--server", server.address, "--delete-range", "5")
    finally:
        server.kill()
    assert (result["delete_ranges"], result["range_ops"], result["last_sequence"]) == (2, True, 51)
    blocks = asyncio.run(stored_blocks(addresses, "ranged"))
    assert [(b.sequence, b.index, b.operation) for b in blocks[50:]] == [(50, 10, 3), (51, 0, 3)]
    assert bad.returncode == 2 and "at least one" in bad.stderr, bad.stderr
    assert worse.returncode == 2 and "is not FIRST:COUNT" in worse.stderr, worse.stderr


def test_send_fails_over_to_the_next_server_in_order(mem_server: ServerProcess) -> None:
    dead = f"127.0.0.1:{pick_port()}"
    result = result_of(tlog_send("--server", dead, "--server", mem_server.address,
                                 "--blocks", "200"))
    assert result["server"] == mem_server.address and result["blocks"] == 200


def test_send_without_any_server_fails_within_the_connect_timeout() -> None:
    started = time.monotonic()
    proc = tlog_send("--server", f"127.0.0.1:{pick_port()}", "--blocks", "10",
                     "--connect-timeout", "0.5")
    assert proc.returncode == 1
    assert "no tlogserver" in proc.stderr and proc.stdout == ""
    assert time.monotonic() - started < 20


def test_send_rejects_a_bad_address() -> None:
    proc = tlog_send("--server", "nowhere", "--blocks", "1")
    assert proc.returncode == 2 and "host:port" in proc.stderr
