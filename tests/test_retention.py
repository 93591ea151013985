"""Retention (issue 16): checkpoints, `tlog compact`, pins, with real redis-servers, a real
tlogserver and the real `tlog` command line.

Every restore after a compaction is compared with a restore of the same point computed
before it (and with the image the written blocks give), so a compaction that loses or
changes anything fails here.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import yaml

from tlog.protocol import block_hash
from tlog.protocol.wire import Block
from tlog.read.player import FileBlockStorage, restore
from tlog.record.aggregation import Keyring, RecordOpener
from tlog.record.crypto import parse_key
from tlog.retention.build import GROUP_STEP, grouped_last_writes
from tlog.retention.lock import CompactionLock
from tlog.storage import any_pool_factory, checkpoint_list_key, compaction_key

from .redis_fixture import RedisProcess
from .serverproc import config_free_env, pick_port
from .test_cli_read import KEY, Client, image, read_args, start_tlogserver, tlog_cli
from .test_decoder import VDISK, ChainWriter

BS = 512  # block size of these vdisks: small, so that 100,000 blocks stay quick
TS0 = 1_760_000_000_000_000_000
WAIT = 60.0


# ---------------------------------------------------------------------------------------------
# Blocks, images, restores


def blocks_from(first: int, count: int, *, seed: int, indexes: int, deletes: float = 0.2,
                ts_step: int = 1_000_000) -> list[Block]:
    """Random writes and deletes over ``indexes`` block indexes, one ms apart."""
    rng = random.Random(seed * 7_919 + first)
    out = []
    for seq in range(first, first + count):
        if rng.random() < deletes:
            data, op = b"", 2
        else:
            data, op = rng.randbytes(BS), 1
        out.append(Block(seq, rng.randrange(indexes), TS0 + seq * ts_step, op,
                         block_hash(data), data))
    return out


def image_of(blocks: Sequence[Block], *, end_seq: int | None = None,
             end_ts: int | None = None) -> bytes:
    """The image the player gives for ``blocks`` (one epoch) up to the bounds."""
    return image(blocks, end_seq=end_seq, end_ts=end_ts, block_size=BS)


def opener() -> RecordOpener:
    return RecordOpener(Keyring.of(parse_key(KEY, "priv-key")), None, "v2")


def restore_image(servers: Sequence[RedisProcess], path: Path, **bounds: int) -> bytes:
    """The vdisk restored in this process (the library's restore) at ``bounds``."""
    async def run() -> bytes:
        factory = any_pool_factory(k=4, m=2, addresses=",".join(s.address for s in servers),
                                   allow_memory=False)
        storage = FileBlockStorage(path, BS)
        try:
            await restore(factory.pool_for(VDISK), VDISK, opener(), storage, **bounds)
        finally:
            await storage.close()
            await factory.close()
        return path.read_bytes()
    return asyncio.run(run())


def used_memory(servers: Sequence[RedisProcess]) -> int:
    total = 0
    for server in servers:
        with server.client() as client:
            total += int(client.info("memory")["used_memory"])
    return total


def cli_restore(servers: Sequence[RedisProcess], path: Path, *extra: str,
                check: bool = True) -> subprocess.CompletedProcess[str]:
    return tlog_cli("restore", *read_args(servers), "--block-size", str(BS), "--output",
                    str(path), *extra, check=check)


def compact(servers: Sequence[RedisProcess], *extra: str,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    return tlog_cli("compact", *read_args(servers), "--no-progress", *extra, check=check)


def chain_keys(servers: Sequence[RedisProcess]) -> tuple[set[bytes], set[bytes]]:
    """(every key on server 0, the records on the chain from the head, checkpoint
    included), to find what a compaction left behind."""
    async def walk() -> set[bytes]:
        from tlog.read.chain import ChainReader
        factory = any_pool_factory(k=4, m=2, addresses=",".join(s.address for s in servers),
                                   allow_memory=False)
        try:
            reader = ChainReader(factory.pool_for(VDISK), VDISK, opener(), workers=0)
            return {link.key for link in await reader.walk()}
        finally:
            await factory.close()
    with servers[0].client() as client:
        keys = set(client.keys("*"))
    return keys, asyncio.run(walk())


def assert_nothing_left_behind(servers: Sequence[RedisProcess]) -> None:
    keys, on_chain = chain_keys(servers)
    lists = {b"last_hash_" + VDISK.encode(), checkpoint_list_key(VDISK)}
    assert keys - on_chain - lists == set(), "records or journal keys left behind"
    assert on_chain - keys == set()


# ---------------------------------------------------------------------------------------------
# A protocol client that counts every failure the server answers


# ---------------------------------------------------------------------------------------------
# 100,000 blocks through a real tlogserver, compacted to the last 20,000 sequences


def test_compaction_keeps_every_retained_point(redis6: list[RedisProcess],
                                               tmp_path: Path) -> None:
    total, keep = 100_000, 20_000
    blocks = blocks_from(0, total, seed=16, indexes=2_000)
    server = start_tlogserver(redis6, KEY, "--flush-size", "25")
    try:
        writer = Client(server.port, VDISK, 0)
        for start in range(0, total, 5_000):
            writer.write(blocks[start:start + 5_000])
        writer.close()
    finally:
        server.kill()
    last = total - 1
    seq_points = [last, last - 1, 95_555, 90_000, 85_123, 81_000, 80_001]
    ts_points = [blocks[s].timestamp for s in (99_000, 88_888, 82_000)] + [
        blocks[97_000].timestamp + 500_000]  # between two blocks
    before: dict[tuple[str, int], bytes] = {}
    for seq in seq_points:
        before["seq", seq] = restore_image(redis6, tmp_path / "img", end_seq=seq)
        assert before["seq", seq] == image_of(blocks, end_seq=seq)
    for ts in ts_points:
        before["ts", ts] = restore_image(redis6, tmp_path / "img", end_ts=ts)
        assert before["ts", ts] == image_of(blocks, end_ts=ts)
    memory_before = used_memory(redis6)

    done = compact(redis6, "--keep-sequences", str(keep))
    found = re.search(r"(\d+) aggregations deleted.*checkpoint of \d+ live blocks \(\d+ "
                      r"deleted\) at sequence (\d+)", done.stdout)
    assert found, done.stdout
    deleted, cut = int(found.group(1)), int(found.group(2))
    assert deleted >= (total - keep) // 25 - 2
    assert total - keep - 25 <= cut < total - keep

    # Every retained point restores as before, through the library and the CLI.
    for (kind, value), expected in before.items():
        bounds = {"end_seq": value} if kind == "seq" else {"end_ts": value}
        assert restore_image(redis6, tmp_path / "img", **bounds) == expected, (kind, value)
    out = cli_restore(redis6, tmp_path / "cli.img")
    assert "from the checkpoint at sequence" in out.stdout
    assert (tmp_path / "cli.img").read_bytes() == before["seq", last]
    cli_restore(redis6, tmp_path / "cli.img", "--end-sequence", str(cut))
    assert (tmp_path / "cli.img").read_bytes() == image_of(blocks, end_seq=cut)

    # Points before the retained window: one clear line naming the oldest one.
    for extra in (["--end-sequence", "50000"], ["--start-sequence", "10"],
                  ["--end-timestamp", str(blocks[1000].timestamp)]):
        refused = cli_restore(redis6, tmp_path / "no.img", *extra, check=False)
        assert refused.returncode == 1, refused
        assert f"oldest restorable point is sequence {cut}" in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1

    verified = tlog_cli("verify", *read_args(redis6))
    assert f"from a checkpoint at sequence {cut}" in verified.stdout
    # Redis memory drops by the share of the log compacted away (about 80 %: the kept
    # fifth, a checkpoint of 2,000 small blocks, Redis' own overhead).
    memory_after = used_memory(redis6)
    base = 6 * 900_000  # an empty redis-server's used_memory, about
    share = (memory_after - base) / (memory_before - base)
    assert 0.12 < share < 0.32, (memory_before, memory_after, share)
    assert_nothing_left_behind(redis6)


# ---------------------------------------------------------------------------------------------
# kill -9 of tlog compact at random points


# The steps `tlog compact` announces (delete twice: it is the longest).
STEPS = ("journal", "build", "register", "delete", "retire", "delete", "plan", "finish")


def _compact_and_kill(servers: Sequence[RedisProcess], step: str | None, delay: float,
                      keep: int) -> tuple[int, str]:
    """`tlog compact` killed -9 ``delay`` s after it announced ``step`` (None: let it
    finish); its exit code and what it printed."""
    env = config_free_env()
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from tlog.cli import main; main()", "compact",
         *read_args(servers), "--keep-sequences", str(keep), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    announced = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if step is not None and line.strip() == f"tlog compact: {step}":
                announced.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if step is not None and announced.wait(WAIT):
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    code = proc.wait(WAIT)
    reader.join(10)
    assert proc.stdout is not None
    return code, proc.stdout.read() + "".join(lines)


def test_kill_9_of_compact_never_hurts_the_log(redis6: list[RedisProcess],
                                               tmp_path: Path) -> None:
    rng = random.Random(1616)
    writer = ChainWriter(redis6)
    written: list[Block] = []

    def append(count: int) -> None:
        fresh = blocks_from(len(written), count, seed=3, indexes=300)
        for start in range(0, count, 5):  # small aggregations: many records to delete
            writer.append(fresh[start:start + 5])
        written.extend(fresh)

    append(3_000)
    kills = 0  # runs killed before they printed their summary
    resumed: list[str] = []
    for run in range(16):
        append(1_500)  # new writes between the runs: there is always something to compact
        step = STEPS[run % len(STEPS)]
        code, output = _compact_and_kill(redis6, step, rng.uniform(0, 0.008), keep=400)
        if "compacted vdisk" not in output:
            assert code == -signal.SIGKILL, output
            kills += 1
        resumed += [line for line in output.splitlines() if "interrupted compaction" in line]
        verified = tlog_cli("verify", *read_args(redis6), check=False)
        assert verified.returncode == 0, (step, output, verified.stdout, verified.stderr)
        last = len(written) - 1
        for seq in (last, last - 150):
            assert restore_image(redis6, tmp_path / "img", end_seq=seq) == image_of(
                written, end_seq=seq), (run, step, seq)
    assert kills >= 10
    # Both kinds of resume happened: a registered checkpoint finished, another undone.
    assert any("finished an interrupted" in line for line in resumed), resumed
    assert any("undid an interrupted" in line for line in resumed), resumed
    code, output = _compact_and_kill(redis6, None, 0, keep=400)
    assert code == 0, output
    assert restore_image(redis6, tmp_path / "img") == image_of(written)
    assert_nothing_left_behind(redis6)
    with redis6[0].client() as client:
        assert client.llen(checkpoint_list_key(VDISK)) == 1
        assert not client.exists(compaction_key(VDISK))
    writer.close()


# ---------------------------------------------------------------------------------------------
# Writes go on during compactions


def test_writes_continue_during_compaction(redis6: list[RedisProcess], tmp_path: Path) -> None:
    server = start_tlogserver(redis6, KEY, "--flush-size", "25")
    model: dict[int, bytes] = {}  # the image's blocks as written (not every block: memory)
    top = -1
    written = 0

    def note(blocks: Sequence[Block]) -> None:
        nonlocal top
        for b in blocks:
            top = max(top, b.index)
            if b.operation == 1:
                model[b.index] = bytes(b.data)
            else:
                model.pop(b.index, None)

    def expected() -> bytes:
        out = bytearray((top + 1) * BS)
        for index, data in model.items():
            out[index * BS:(index + 1) * BS] = data
        return bytes(out)

    env = config_free_env()
    try:
        writer = Client(server.port, VDISK, 0)
        for _ in range(4):  # four compactions, each with writes going on all through it
            compaction = subprocess.Popen(
                [sys.executable, "-c", "from tlog.cli import main; main()", "compact",
                 *read_args(redis6), "--keep-sequences", "1000", "--no-progress"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            chunks = 0
            while compaction.poll() is None or chunks < 4:
                fresh = blocks_from(written, 250, seed=5, indexes=400)
                writer.write(fresh)  # asserts no RecvFailed / FlushFailed
                note(fresh)
                written += len(fresh)
                chunks += 1
            out, err = compaction.communicate()
            assert compaction.returncode == 0, out + err
            assert "compacted vdisk" in out or "nothing to compact" in out, out
        writer.close()
        assert restore_image(redis6, tmp_path / "img") == expected()
        assert "from a checkpoint" in tlog_cli("verify", *read_args(redis6)).stdout

    finally:
        server.kill()
    assert restore_image(redis6, tmp_path / "img") == expected()
    assert tlog_cli("verify", *read_args(redis6)).returncode == 0


def test_a_client_numbering_again_after_compaction_loses_nothing(
        redis6: list[RedisProcess], tmp_path: Path) -> None:
    """A client that numbers again from 0 (a restarted Go client), on a log short enough for
    its first blocks to be checked as resends, while the sequences it reuses were compacted
    away: its writes are new ones (a new epoch), none is taken for a resend and lost."""
    first = blocks_from(0, 6_000, seed=21, indexes=300)
    again = [Block(b.sequence, b.index, b.timestamp + 10**15, b.operation, b.hash, b.data)
             for b in blocks_from(0, 500, seed=22, indexes=300)]
    server = start_tlogserver(redis6, KEY, "--flush-size", "25")
    try:
        writer = Client(server.port, VDISK, 0)
        writer.write(first)
        writer.close()
        compact(redis6, "--keep-sequences", "1000")
        writer = Client(server.port, VDISK, 0)
        writer.write(again)
        writer.close()
        server.wait_for_log("epoch 1 starts at sequence 0")
    finally:
        server.kill()
    model = bytearray(image_of(first))
    for b in again:
        model[b.index * BS:(b.index + 1) * BS] = b.data if b.operation == 1 else bytes(BS)
    assert restore_image(redis6, tmp_path / "img") == bytes(model)
    verified = tlog_cli("verify", *read_args(redis6))
    assert "2 epochs" in verified.stdout, verified.stdout


# ---------------------------------------------------------------------------------------------
# Pins, dry runs, the lease


@pytest.fixture
def compactable(redis6: list[RedisProcess]) -> Iterator[tuple[list[RedisProcess], list[Block]]]:
    writer = ChainWriter(redis6)
    blocks = blocks_from(0, 3_000, seed=9, indexes=200)
    for start in range(0, len(blocks), 25):
        writer.append(blocks[start:start + 25])
    yield redis6, blocks
    writer.close()


def test_a_pinned_point_survives_compaction(compactable: tuple[list[RedisProcess], list[Block]],
                                            tmp_path: Path) -> None:
    servers, blocks = compactable
    args = read_args(servers)
    pinned = tlog_cli("pin", *args, "--name", "before-upgrade", "--sequence", "1234")
    assert "pinned before-upgrade: sequence 1234" in pinned.stdout
    at_time = tlog_cli("pin", *args, "--name", "by-time", "--timestamp",
                       str(blocks[2100].timestamp + 1))
    assert "sequence 2100" in at_time.stdout
    assert tlog_cli("pin", *args, "--name", "by-time", check=False).returncode == 1
    listed = tlog_cli("pins", *args).stdout
    assert listed.index("before-upgrade") < listed.index("by-time")

    dry = compact(servers, "--keep-sequences", "100", "--dry-run")
    assert "dry run" in dry.stdout and "held back by pin 'before-upgrade'" in dry.stdout
    assert restore_image(servers, tmp_path / "img", end_seq=100) == image_of(blocks,
                                                                          end_seq=100)
    done = compact(servers, "--keep-sequences", "100")
    assert "held back by pin 'before-upgrade'" in done.stdout
    for name, seq in (("before-upgrade", 1234), ("by-time", 2100)):
        cli_restore(servers, tmp_path / "pin.img", "--pin", name)
        assert (tmp_path / "pin.img").read_bytes() == image_of(blocks, end_seq=seq)

    tlog_cli("unpin", *args, "--name", "before-upgrade")
    done = compact(servers, "--keep-sequences", "100")
    assert "held back by pin 'by-time'" in done.stdout
    cli_restore(servers, tmp_path / "pin.img", "--pin", "by-time")
    assert (tmp_path / "pin.img").read_bytes() == image_of(blocks, end_seq=2100)
    gone = cli_restore(servers, tmp_path / "pin.img", "--pin", "before-upgrade", check=False)
    assert gone.returncode == 1 and "no pin named 'before-upgrade'" in gone.stderr
    refused = cli_restore(servers, tmp_path / "no.img", "--end-sequence", "1234", check=False)
    assert "before the retained log" in refused.stderr
    assert "oldest restorable point is sequence 2099" in refused.stderr
    late = tlog_cli("pin", *args, "--name", "too-late", "--sequence", "1234", check=False)
    assert late.returncode == 1 and late.stderr.startswith(
        "error: vdisk vd1: cannot pin sequence 1234: it was compacted away (it is before the "
        "retained log); the oldest point left is sequence 2099 ("), late.stderr
    assert "roll back" not in late.stderr
    tlog_cli("unpin", *args, "--name", "by-time")
    compact(servers, "--keep-sequences", "100")
    assert restore_image(servers, tmp_path / "img") == image_of(blocks)
    assert_nothing_left_behind(servers)


# ---------------------------------------------------------------------------------------------
# The event loop keeps turning while tlogserver compacts


def test_the_last_writes_are_grouped_in_steps() -> None:
    """Between its passes, a compaction groups the last write of every block index by the
    aggregation that holds it (a million of them for a 4 GiB vdisk of 4 KiB blocks) a step
    at a time, a task next to it running between the steps, into what one sort gives."""
    rng = random.Random(5)
    last = {rng.randrange(1 << 30): rng.randrange(800) << 32 | rng.randrange(25)
            for _ in range(20 * GROUP_STEP)}
    expected: dict[int, list[int]] = {}
    for place in sorted(last.values()):
        expected.setdefault(place >> 32, []).append(place & 0xFFFF_FFFF)

    async def grouped() -> tuple[dict[int, list[int]], list[int], int]:
        turns = 0
        done = False

        async def probe() -> None:
            nonlocal turns
            while not done:
                turns += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(probe())
        await asyncio.sleep(0)
        turns = 0
        wanted, order = await grouped_last_writes(last, 800)
        done = True
        await task
        return wanted, order, turns

    wanted, order, turns = asyncio.run(grouped())
    assert wanted == expected and order == sorted(expected) and not last
    assert turns >= 20


def test_a_checkpoint_of_64k_blocks_is_built_in_steps_and_restores(
        redis6: list[RedisProcess], tmp_path: Path) -> None:
    """Aggregations of 3.3 MB and checkpoint parts of up to 16 MB (64 KiB blocks): read,
    sealed and erasure-coded in threads (`tlog.record.steps`) by the compaction tlogserver
    runs on its event loop; the image restores as before, through the checkpoint."""
    size = 64 * 1024
    rng = random.Random(3)
    blocks = []
    for seq in range(1_000):
        data = rng.randbytes(size) if seq % 10 else b""
        blocks.append(Block(seq, rng.randrange(300), TS0 + seq, 1 if data else 2,
                            block_hash(data), data))
    writer = ChainWriter(redis6)
    for start in range(0, len(blocks), 50):
        writer.append(blocks[start:start + 50])
    writer.close()

    async def compact_here() -> str:
        from tlog.record.aggregation import V2Writer
        from tlog.retention import Compactor, RetentionPolicy

        factory = any_pool_factory(k=4, m=2, addresses=",".join(s.address for s in redis6),
                                   allow_memory=False)
        try:
            compactor = Compactor(factory.pool_for(VDISK), VDISK, opener(),
                                  V2Writer(parse_key(KEY, "priv-key"), VDISK),
                                  processes=False)
            _plan, summary = await compactor.compact(RetentionPolicy(keep_sequences=300))
            return summary.line()
        finally:
            await factory.close()

    line = asyncio.run(compact_here())
    assert "checkpoint of" in line and "at sequence 699" in line, line

    async def restored() -> bytes:
        factory = any_pool_factory(k=4, m=2, addresses=",".join(s.address for s in redis6),
                                   allow_memory=False)
        storage = FileBlockStorage(tmp_path / "img", size)
        try:
            await restore(factory.pool_for(VDISK), VDISK, opener(), storage)
        finally:
            await storage.close()
            await factory.close()
        return (tmp_path / "img").read_bytes()

    assert asyncio.run(restored()) == image(blocks, block_size=size)


def test_one_compaction_at_a_time(compactable: tuple[list[RedisProcess], list[Block]],
                                  tmp_path: Path) -> None:
    servers, blocks = compactable

    async def hold_then_release(during: object) -> None:
        factory = any_pool_factory(k=4, m=2, addresses=",".join(s.address for s in servers),
                                   allow_memory=False)
        try:
            async with CompactionLock(factory.pool_for(VDISK), VDISK):
                await asyncio.to_thread(during)  # type: ignore[arg-type]
        finally:
            await factory.close()

    refused: list[subprocess.CompletedProcess[str]] = []
    asyncio.run(hold_then_release(lambda: refused.append(
        compact(servers, "--keep-sequences", "100", check=False))))
    assert refused[0].returncode == 1
    assert f"another compaction is running (process {os.getpid()} on" in refused[0].stderr
    assert restore_image(servers, tmp_path / "img", end_seq=50) == image_of(blocks, end_seq=50)
    compact(servers, "--keep-sequences", "100")  # the lease was given back
    assert restore_image(servers, tmp_path / "img") == image_of(blocks)


# ---------------------------------------------------------------------------------------------
# tlogserver applies the policies itself


def test_tlogserver_compacts_by_policy(redis6: list[RedisProcess], tmp_path: Path) -> None:
    from .test_operations import scrape, value

    config = tmp_path / "tlog.yaml"
    config.write_text(yaml.safe_dump({"vdisks": {
        VDISK: {"retention": {"keep_sequences": 1000, "interval": "1s"}},
        "vd2": {"retention": "off"}}}))
    metrics = pick_port()
    server = start_tlogserver(redis6, KEY, "--flush-size", "25", "--config", str(config),
                              "--retention-keep-bytes", "1GiB", "--retention-interval", "1s",
                              "--metrics-address", f"127.0.0.1:{metrics}")
    blocks = blocks_from(0, 10_000, seed=31, indexes=500)
    other = blocks_from(0, 2_000, seed=32, indexes=500)
    try:
        writer = Client(server.port, VDISK, 0)
        writer.write(blocks[:5_000])
        server.wait_for_log(r"retention \(keep 1000 sequences\): compacted vdisk vd1", WAIT)
        writer.write(blocks[5_000:])  # and writes go on while it keeps compacting
        other_writer = Client(server.port, "vd2", 0)
        other_writer.write(other)
        line = server.wait_for_log(r"compacted vdisk vd1: .* at sequence 89\d\d ", WAIT)
        assert "oldest restorable point" in line
        samples = asyncio.run(scrape(metrics))
        records = value(samples, "tlog_log_records", vdisk=VDISK)
        assert 40 <= records <= 1000 / 25 + 50, records  # what the policy keeps, give or take
        assert value(samples, "tlog_log_records", vdisk="vd2") == 2_000 / 25
        assert value(samples, "tlog_log_bytes", vdisk="vd2") > 0.7 * 2_000 * BS * 1.5  # 80 % sets
        assert value(samples, "tlog_log_last_compaction_timestamp_seconds", vdisk=VDISK) > 0
        assert value(samples, "tlog_log_last_compaction_timestamp_seconds", vdisk="vd2") == 0
        age = value(samples, "tlog_log_oldest_restorable_age_seconds", vdisk=VDISK)
        assert age > 0  # the blocks' timestamps are in the past
        assert value(samples, "tlog_compactions_total", result="ok") >= 2
        assert value(samples, "tlog_compactions_total", result="failed") == 0
        assert value(samples, "tlog_compacted_aggregations_total") >= 8_000 / 25
        writer.close()
        # vd2 (still served) compacted by hand: the server sees it (it looks every
        # --retention-interval) and measures the log again, though it never compacts vd2.
        done = tlog_cli("compact", *read_args(redis6, "vd2"), "--no-progress",
                        "--keep-sequences", "100").stdout
        deleted = int(re.search(r": (\d+) aggregations deleted", done).group(1))  # type: ignore[union-attr]
        assert deleted > 0, done
        server.wait_for_log(r"the log was compacted by someone else", WAIT)
        deadline = time.monotonic() + WAIT
        while True:
            samples = asyncio.run(scrape(metrics))
            if value(samples, "tlog_log_records", vdisk="vd2") == 2_000 / 25 - deleted:
                break
            assert time.monotonic() < deadline, (
                "tlog_log_records of vd2 not measured again",
                value(samples, "tlog_log_records", vdisk="vd2"), deleted)
            time.sleep(0.2)
        other_writer.close()
    finally:
        server.kill()
    assert restore_image(redis6, tmp_path / "img") == image_of(blocks)
    assert "from a checkpoint" in tlog_cli("verify", *read_args(redis6)).stdout
    assert "from a checkpoint" in tlog_cli("verify", *read_args(redis6, "vd2")).stdout


def test_retention_config_errors(tmp_path: Path) -> None:
    for flags, yaml_text, expected in (
            (["--retention-keep-since", "soon"], None, "not a duration: 'soon'"),
            (["--retention-keep-sequences", "0"], None, "retention-keep-sequences: must be"),
            ([], {"vdisks": {"vd1": {"retention": {"keep_bytes": "lots"}}}},
             "vdisks.vd1.retention: not a size: 'lots'"),
            ([], {"vdisks": {"vd1": {"retention": {"keep": 5}}}},
             "vdisks.vd1.retention: unknown key(s) keep"),
            ([], {"vdisks": {"vd1": {"retention": {"interval": "1h"}}}},
             "needs keep_since, keep_sequences or keep_bytes")):
        args = ["--memory-storage", *flags]
        if yaml_text is not None:
            path = tmp_path / "bad.yaml"
            path.write_text(yaml.safe_dump(yaml_text))
            args += ["--config", str(path)]
        proc = subprocess.run([sys.executable, "-m", "tlogserver", "--address",
                               "127.0.0.1:0", *args], capture_output=True, text=True,
                              timeout=WAIT)
        assert proc.returncode == 2, proc
        assert expected in proc.stderr, (expected, proc.stderr)
