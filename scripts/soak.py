#!/usr/bin/env python3
"""Crash-consistency soak: random writes and deletes through a tlogserver killed -9 at random.

One vdisk is written by the real client (`tlog.client.TlogClient`) through a real
tlogserver subprocess onto six real redis-servers (k=4, m=2). While the client writes,
the server is killed with SIGKILL at random moments and started again on the same port
after a random pause; the client reconnects by itself and resends what was not flushed.
At the end the log is restored with ``tlog restore`` (a subprocess) and compared with
the image the writes should give, byte for byte, and ``tlog verify`` must call the chain
sound. Redis is never killed, so it needs no persistence here.

The figures go to stdout, one ``name: value`` per line; the exit status is 0 when the
restored image is right and the chain sound. ``make soak`` runs it with 100,000 blocks and
12 kills; ``tests/test_soak.py`` runs a short version.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.redis_fixture import RedisFactory  # noqa: E402
from tests.serverproc import ServerProcess, storage_args  # noqa: E402
from tlog.client import TlogClient  # noqa: E402
from tlog.protocol.status import BlockStatus, Operation  # noqa: E402

KEY = "12345678901234567890123456789012"
BLOCK_SIZE = 4096
VDISK = "soak"
#: Bound on every wait of the soak (a flush, a restore): it fails rather than hangs.
WAIT = 300.0
#: The client's buffer of unflushed blocks (about 500 blocks).
MAX_UNFLUSHED = 2 * 1024 * 1024


@dataclass
class SoakResult:
    """The figures of one soak run."""

    blocks: int
    writes: int = 0
    deletes: int = 0
    kills: int = 0
    kill_at: list[int] = field(default_factory=list)  # blocks flushed when each kill landed
    down_seconds: float = 0.0  # total time without a server
    send_seconds: float = 0.0  # first block sent to last FlushOK
    reconnects: int = 0
    resends: int = 0  # blocks sent again without RecvOK after the resend timeout
    reconnect_resends: int = 0  # blocks sent again after reconnecting
    flush_failed: int = 0  # FlushFailed answers seen
    restore_seconds: float = 0.0
    restore_summary: str = ""
    duplicates: int = 0  # blocks stored twice (re-flushed after a crash), skipped on restore
    aggregations: int = 0
    verify_seconds: float = 0.0
    verify_summary: str = ""
    warnings: dict[str, int] = field(default_factory=dict)  # verify's warnings, by kind
    repair_summary: str = ""
    repair_ok: bool = False
    warnings_after_repair: dict[str, int] = field(default_factory=dict)
    image_ok: bool = False
    verify_ok: bool = False
    first_difference: int | None = None  # block index where the images first differ

    @property
    def ok(self) -> bool:
        return self.image_ok and self.verify_ok and self.repair_ok

    def lines(self) -> list[str]:
        rate = self.blocks / self.send_seconds if self.send_seconds else 0.0
        return [
            f"blocks: {self.blocks} ({self.writes} writes, {self.deletes} deletes)",
            f"kills (SIGKILL of tlogserver): {self.kills}, after blocks flushed: "
            + ", ".join(str(n) for n in self.kill_at),
            f"time without a server: {self.down_seconds:.2f} s",
            f"write phase: {self.send_seconds:.1f} s ({rate:.0f} blocks/s, restarts included)",
            f"client reconnects: {self.reconnects}; blocks resent after a reconnect: "
            f"{self.reconnect_resends}; resent after the resend timeout: {self.resends}; "
            f"FlushFailed answers: {self.flush_failed}",
            f"stored: {self.aggregations} aggregations; {self.duplicates} blocks stored twice "
            "(re-flushed after a crash, replayed once)",
            f"restore: {self.restore_seconds:.1f} s: {self.restore_summary}",
            f"verify: {self.verify_seconds:.1f} s: {self.verify_summary}",
            f"verify warnings: {_kinds(self.warnings)}",
            f"tlog repair: {self.repair_summary}",
            f"verify warnings after the repair: {_kinds(self.warnings_after_repair)}",
            "restored image equals the expected image: "
            + ("yes" if self.image_ok
               else f"NO (first difference at block {self.first_difference})"),
            f"result: {'PASS' if self.ok else 'FAIL'}",
        ]


WARNING_KINDS = {
    "stored before": "aggregations holding duplicates",
    "(readable from parity)": "aggregations missing pieces",
    "does not decode": "last-hash entries that do not decode",
}


def warning_kinds(stderr: str) -> dict[str, int]:
    """``tlog verify``'s warnings counted by kind."""
    counts: dict[str, int] = {}
    for line in stderr.splitlines():
        if not line.startswith("warning:"):
            continue
        kind = next((name for text, name in WARNING_KINDS.items() if text in line), "other")
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _kinds(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "none"


def block_data(seed: int, sequence: int, index: int) -> bytes:
    """A block's content, made again from its sequence: distinct per write, compressible."""
    head = hashlib.blake2b(f"{seed}:{sequence}:{index}".encode(), digest_size=32).digest()
    return (head * (BLOCK_SIZE // len(head)))[:BLOCK_SIZE]


def plan(blocks: int, indexes: int, seed: int,
         delete_rate: float) -> list[tuple[int, int]]:
    """The workload: (operation, index) per sequence 0..blocks-1."""
    rng = random.Random(seed)
    return [(int(Operation.DELETE) if rng.random() < delete_rate else int(Operation.SET),
             rng.randrange(indexes)) for _ in range(blocks)]


def expected_image(ops: list[tuple[int, int]], indexes: int, seed: int) -> bytes:
    """The disk after every operation in sequence order (deleted blocks read as zeros)."""
    last: dict[int, int | None] = {}
    for sequence, (op, index) in enumerate(ops):
        last[index] = sequence if op == Operation.SET else None
    image = bytearray(indexes * BLOCK_SIZE)
    for index, sequence in last.items():
        if sequence is not None:
            image[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE] = block_data(seed, sequence,
                                                                           index)
    return bytes(image)


def tlog_command(*args: str) -> subprocess.CompletedProcess[str]:
    """The real `tlog` command line in a subprocess (no TLOG_* from the environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TLOG_")}
    return subprocess.run([sys.executable, "-c", "from tlog.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=WAIT, env=env)


async def write_through_crashes(server: ServerProcess, ops: list[tuple[int, int]], seed: int,
                                kills: int, rng: random.Random, result: SoakResult) -> None:
    """Send every operation with the real client while killing and restarting ``server``.

    The kills are spread over the run by progress: kill ``i`` lands a random few
    milliseconds after the client saw a random number of blocks flushed, and only once the
    client is connected again after the previous one (a kill of a server nobody reached
    yet would test nothing).
    """
    loop = asyncio.get_running_loop()
    blocks = len(ops)
    points = sorted(rng.sample(range(blocks // 20, blocks - blocks // 10), kills))
    progress = asyncio.Event()

    def on_response(status: int, sequences: object) -> None:
        if status == BlockStatus.FLUSH_FAILED:
            result.flush_failed += 1
        progress.set()

    def restart(pause: float) -> float:
        started = time.monotonic()
        server.kill()
        if pause:
            time.sleep(pause)  # the outage, in this thread only: the client keeps running
        server.start()
        return time.monotonic() - started

    # A small buffer keeps the writer close to what is flushed (as an NBD server under
    # load is), so the kills land in the middle of the stream.
    client = await TlogClient.open([server.address], VDISK, 0, timeout=WAIT,
                                   reconnect_max_delay=0.25, max_unflushed_bytes=MAX_UNFLUSHED,
                                   on_response=on_response)

    async def until(condition: Callable[[], bool], what: str) -> None:
        deadline = loop.time() + WAIT
        while not condition():
            progress.clear()
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"soak: no {what} within {WAIT} s")
            try:
                await asyncio.wait_for(progress.wait(), min(left, 0.5))
            except TimeoutError:
                pass  # reconnects answer nothing: look again

    async def killer() -> None:
        for point in points:
            reconnects = client.reconnects
            await until(lambda p=point: client.flushed_blocks >= p, f"{point} blocks flushed")
            await asyncio.sleep(rng.random() * 0.05)  # reading, ordering or storing
            result.kill_at.append(client.flushed_blocks)
            result.down_seconds += await loop.run_in_executor(None, restart,
                                                              rng.random() * 0.3)
            result.kills += 1
            await until(lambda r=reconnects: client.reconnects > r, "reconnect")

    started = time.monotonic()
    kills_task = loop.create_task(killer())
    try:
        for sequence, (op, index) in enumerate(ops):
            data = block_data(seed, sequence, index) if op == Operation.SET else b""
            await client.send(op, sequence, index, None, data)
            if kills_task.done():
                kills_task.result()  # raise its failure now
        await asyncio.wait_for(kills_task, WAIT)
        await client.wait_flushed(timeout=WAIT)
        result.send_seconds = time.monotonic() - started
        stats = client.stats()
        result.reconnects = stats.reconnects
        result.resends = stats.resends
        result.reconnect_resends = stats.reconnect_resends
        if stats.unflushed_blocks:
            raise AssertionError(f"{stats.unflushed_blocks} blocks still unflushed")
    finally:
        kills_task.cancel()
        await client.close()


def run_soak(workdir: Path, *, blocks: int, kills: int, indexes: int = 4096, seed: int = 1,
             delete_rate: float = 0.1, log: bool = False) -> SoakResult:
    """Run the soak in ``workdir`` (redis data, server log, the image) and return its figures."""
    if blocks < 100 or kills < 1:
        raise ValueError("need at least 100 blocks and 1 kill")
    rng = random.Random(seed)
    ops = plan(blocks, indexes, seed, delete_rate)
    result = SoakResult(blocks)
    result.deletes = sum(1 for op, _ in ops if op == Operation.DELETE)
    result.writes = blocks - result.deletes
    factory = RedisFactory(workdir / "redis")
    server: ServerProcess | None = None
    try:
        redis = factory(6)
        addresses = [r.address for r in redis]
        server = ServerProcess(*storage_args(addresses, priv_key=KEY),
                               log_path=workdir / "tlogserver.log" if log else None)
        server.start()
        asyncio.run(write_through_crashes(server, ops, seed, kills, rng, result))
        server.terminate()
        read = ["--vdisk", VDISK, "--storage-addresses", ",".join(addresses), "--priv-key", KEY]
        image = workdir / "restored.img"
        started = time.monotonic()
        proc = tlog_command("restore", *read, "--output", str(image),
                            "--size", str(indexes * BLOCK_SIZE))
        result.restore_seconds = time.monotonic() - started
        result.restore_summary = (proc.stdout + proc.stderr).strip()
        if proc.returncode == 0:
            found = re.search(r"(\d+) duplicate blocks skipped", proc.stdout)
            result.duplicates = int(found.group(1)) if found else 0
            found = re.search(r"from (\d+) aggregations", proc.stdout)
            result.aggregations = int(found.group(1)) if found else 0
            got = image.read_bytes()
            want = expected_image(ops, indexes, seed)
            result.image_ok = got == want
            if not result.image_ok:
                result.first_difference = next(
                    (i for i in range(max(len(got), len(want)) // BLOCK_SIZE)
                     if got[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
                     != want[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]), None)
        started = time.monotonic()
        proc = tlog_command("verify", *read)
        result.verify_seconds = time.monotonic() - started
        result.verify_ok = proc.returncode == 0 and "chain sound" in proc.stdout
        result.verify_summary = proc.stdout.strip() or proc.stderr.strip()[-500:]
        result.warnings = warning_kinds(proc.stderr)
        # Pieces a kill left missing (a round cut short) are rebuilt by the repair's scan;
        # what stays are the duplicates, which are no damage.
        proc = tlog_command("repair", *read)
        result.repair_ok = proc.returncode == 0
        result.repair_summary = (proc.stdout.strip() or proc.stderr.strip())[-500:]
        proc = tlog_command("verify", *read)
        result.verify_ok = result.verify_ok and proc.returncode == 0
        result.warnings_after_repair = warning_kinds(proc.stderr)
    finally:
        if server is not None:
            server.kill()
        factory.stop_all()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=100_000)
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--indexes", type=int, default=4096,
                        help="block indexes written (the vdisk size in blocks)")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    parser.add_argument("--delete-rate", type=float, default=0.1)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tlog-soak-"))
    print(f"seed: {args.seed} (work directory {workdir})", flush=True)
    result = run_soak(workdir, blocks=args.blocks, kills=args.kills, indexes=args.indexes,
                      seed=args.seed, delete_rate=args.delete_rate, log=True)
    for line in result.lines():
        print(line)
    if not args.keep and result.ok:
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
