"""The durability promise of FlushOK (docs/durability.md), checked by pulling the plug.

Every block is written with the real client through a real tlogserver onto six real
redis-servers; the moment the FlushOK of the last block arrives, all seven processes get
SIGKILL. The redis-servers are started again on their data directories and ``tlog
restore`` must give back every flushed block. With the persistence the promise needs
(``appendonly yes``, ``appendfsync always``) it does; without persistence nothing
survives, which is what the documentation says too.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tlog.client import TlogClient
from tlog.protocol.status import BlockStatus, Operation

from .redis_fixture import RedisFactory
from .serverproc import ServerProcess, config_free_env, storage_args
from .wireclient import KEY

BLOCK_SIZE = 4096
INDEXES = 300
BLOCKS = 2000
WAIT = 30.0


def workload(seed: int) -> list[tuple[int, int, bytes]]:
    """(operation, index, data) per sequence: random writes and some deletes."""
    rng = random.Random(seed)
    out = []
    for _ in range(BLOCKS):
        if rng.random() < 0.1:
            out.append((int(Operation.DELETE), rng.randrange(INDEXES), b""))
        else:
            out.append((int(Operation.SET), rng.randrange(INDEXES), rng.randbytes(BLOCK_SIZE)))
    return out


def image(ops: Sequence[tuple[int, int, bytes]]) -> bytes:
    out = bytearray(INDEXES * BLOCK_SIZE)
    for op, index, data in ops:
        out[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE] = (data if op == Operation.SET
                                                            else bytes(BLOCK_SIZE))
    return bytes(out)


def tlog(*args: str) -> subprocess.CompletedProcess[str]:
    env = config_free_env()
    return subprocess.run([sys.executable, "-c", "from tlog.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("persistence", ["aof-always", "none"])
def test_kill9_of_everything_right_after_flush_ok(redis_factory: RedisFactory, tmp_path: Path,
                                                 persistence: str) -> None:
    extra: dict[str, Any] = ({"appendonly": "yes", "appendfsync": "always"}
                             if persistence == "aof-always" else {})
    redis = redis_factory(6, **extra)
    addresses = [r.address for r in redis]
    server = ServerProcess(*storage_args(addresses)).start()
    pids = [r.process.pid for r in redis if r.process is not None] + [server.pid or 0]
    ops = workload(5)
    last = BLOCKS - 1

    async def scenario() -> None:
        done = asyncio.Event()

        def on_response(status: int, sequences: Sequence[int]) -> None:
            if status == BlockStatus.FLUSH_OK and last in sequences:
                for pid in pids:  # at once, from the callback that sees the FlushOK
                    os.kill(pid, signal.SIGKILL)
                done.set()

        client = await TlogClient.open([server.address], "durable", on_response=on_response)
        for seq, (op, index, data) in enumerate(ops):
            await client.send(op, seq, index, None, data)
        client.force_flush_at(last)
        await asyncio.wait_for(done.wait(), WAIT)
        await client.close()

    try:
        asyncio.run(scenario())
    finally:
        server.kill()
    for r in redis:
        r.stop()  # reap the killed process
        r.start()  # same directory: reloads what it persisted
    out = tmp_path / "restored.img"
    proc = tlog("restore", "--vdisk", "durable", "--storage-addresses", ",".join(addresses),
                "--priv-key", KEY, "--output", str(out), "--size", str(INDEXES * BLOCK_SIZE))
    if persistence == "none":
        assert proc.returncode == 1 and "vdisk durable: no log" in proc.stderr
        return
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"sequences 0..{last}" in proc.stdout
    assert out.read_bytes() == image(ops)
    proc = tlog("verify", "--vdisk", "durable", "--storage-addresses", ",".join(addresses),
                "--priv-key", KEY)
    assert proc.returncode == 0 and "chain sound" in proc.stdout, proc.stdout + proc.stderr
