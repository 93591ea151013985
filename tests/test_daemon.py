"""tlogserver as a real process: killed and restarted, drained on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from tlog.protocol import ClientConnection

from .redis_fixture import free_port
from .serverproc import start_server, storage_args
from .wireclient import KEY, WireClient, chain_blocks, read_chain


def data(seq: int) -> bytes:
    return seq.to_bytes(8, "little") * 512


def test_sigkill_and_restart_continues_the_chain(redis6: list[Any]) -> None:
    addresses = [r.address for r in redis6]
    server = start_server(*storage_args(addresses, priv_key=KEY))
    port = server.port

    async def send(first: int, last: int) -> None:
        client = await WireClient.connect(port, first=first)
        for seq in range(first, last):
            client.send(seq, data(seq))
        client.write(ClientConnection.send_force_flush(last - 1))
        await client.wait_flushed(range(first, last))
        await client.close()

    try:
        asyncio.run(send(0, 60))
        server.kill()
        before = read_chain(addresses, "vd")
        server.start()  # same port, same storage
        asyncio.run(send(60, 110))
    finally:
        server.kill()
    chain = read_chain(addresses, "vd")
    assert [a.hash for a in chain[:len(before)]] == [a.hash for a in before]
    assert chain[len(before)].prev == before[-1].hash
    assert [s for s, _, _ in chain_blocks(chain)] == list(range(110))


def test_sigterm_drains_pending_blocks_and_exits_zero(redis6: list[Any]) -> None:
    addresses = [r.address for r in redis6]
    server = start_server(*storage_args(addresses, priv_key=KEY), "--flush-time", "300")
    port = server.port
    exit_code: list[int | None] = []

    async def scenario() -> WireClient:
        client = await WireClient.connect(port)
        for seq in range(10):  # fewer than flush-size: only a drain stores them
            client.send(seq, data(seq))
        await client.wait_for(lambda: len(client.events) == 11, "RecvOK x10")
        draining = asyncio.get_running_loop().run_in_executor(None, server.terminate)
        await client.wait_flushed(range(10))
        await client.wait_closed()
        exit_code.append(await draining)
        return client

    try:
        asyncio.run(scenario())
        assert exit_code == [0]
    finally:
        server.kill()
    assert [s for s, _, _ in chain_blocks(read_chain(addresses, "vd"))] == list(range(10))


@pytest.mark.parametrize("entry", [["-m", "tlogserver"],
                                   ["-c", "from tlogserver.cli import main; main()"]])
def test_entry_points_run_the_server(entry: list[str]) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, *entry, "--address", f"127.0.0.1:{port}"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if "listening on" in line or not line:
                break
        assert "listening on 127.0.0.1" in line
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
