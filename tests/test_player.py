"""tlog.read.player: the disk-image and Redis block storages, and replays of real chains."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tlog.protocol import block_hash
from tlog.protocol.wire import Block
from tlog.read.chain import ChainReader
from tlog.read.limiter import Limiter
from tlog.read.player import (
    BlockStorage,
    FileBlockStorage,
    Player,
    PlayerError,
    RedisBlockStorage,
    restore,
)
from tlog.record.pieces import DecodeError
from tlog.storage import ServerAddress

from .redis_fixture import RedisFactory, RedisProcess
from .test_decoder import VDISK, ChainWriter, image_of, make_blocks, pool_of, run, v2_opener

BS = 4096


def setb(seq: int, index: int, data: bytes, ts: int = 0) -> Block:
    return Block(seq, index, ts, 1, block_hash(data), data)


def delb(seq: int, index: int, ts: int = 0) -> Block:
    return Block(seq, index, ts, 2, block_hash(b""), b"")


async def contents(storage: BlockStorage, indexes: Sequence[int]) -> dict[int, bytes]:
    return {i: await storage.read(i) for i in indexes}


def model(blocks: Sequence[Block], block_size: int = BS) -> dict[int, bytes]:
    """What every touched index reads as after ``blocks``."""
    out: dict[int, bytes] = {}
    for b in blocks:
        out[b.index] = bytes(b.data).ljust(block_size, b"\0") if b.operation == 1 else bytes(
            block_size)
    return out


# ---------------------------------------------------------------------------------------------
# Disk image


def test_file_writes_at_index_times_block_size_and_stays_sparse(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    far = 250_000  # ~1 GB into the image

    async def go() -> None:
        storage = FileBlockStorage(path, BS)
        await storage.apply([setb(0, 3, b"a" * BS), setb(1, far, b"b" * BS)])
        await storage.close()

    run(go())
    assert os.path.getsize(path) == (far + 1) * BS
    with open(path, "rb") as image:
        head = image.read(5 * BS)
        image.seek(far * BS)
        tail = image.read()
    assert head == bytes(3 * BS) + b"a" * BS + bytes(BS) and tail == b"b" * BS
    assert os.stat(path).st_blocks * 512 < 1_000_000  # holes, not a gigabyte of zeroes


def test_file_delete_short_data_and_order_within_a_batch(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    blocks = [
        setb(0, 0, b"x" * BS), setb(1, 1, b"y" * BS), setb(2, 2, b"z" * BS),
        delb(3, 1),  # inside the file: reads as zeroes afterwards
        setb(4, 2, b"w" * BS),  # the same index again in one batch: the later one wins
        setb(5, 3, b"short"),  # padded with zeroes
        setb(6, 4, b"q" * BS), setb(7, 5, b"r" * BS),  # adjacent: one pwritev
        delb(8, 9),  # past the end: the image grows to cover it
    ]

    async def go() -> dict[int, bytes]:
        storage = FileBlockStorage(path, BS)
        try:
            await storage.apply(blocks)
        finally:
            await storage.close()
        again = FileBlockStorage(path, BS, truncate=False)
        try:
            return await contents(again, range(10))
        finally:
            await again.close()

    got = run(go())
    assert got == {i: model(blocks).get(i, bytes(BS)) for i in range(10)}
    assert got[3] == b"short" + bytes(BS - 5)
    assert os.path.getsize(path) == 10 * BS


def test_file_keep_existing_applies_onto_the_image(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"o" * (4 * BS))

    async def go(truncate: bool) -> bytes:
        storage = FileBlockStorage(path, BS, truncate=truncate)
        await storage.apply([setb(0, 1, b"n" * BS)])
        await storage.close()
        return path.read_bytes()

    assert run(go(False)) == b"o" * BS + b"n" * BS + b"o" * (2 * BS)
    assert run(go(True)) == bytes(BS) + b"n" * BS


@pytest.mark.parametrize(("block", "message"), [
    (setb(7, 0, b"x" * (BS + 1)), "do not fit a block"),
    (setb(8, -1, b"x"), "negative block index"),
    (Block(9, 0, 0, 5, b"", b""), "unknown operation 5"),
])
def test_unusable_blocks_are_refused_with_their_sequence(tmp_path: Path, block: Block,
                                                        message: str) -> None:
    async def go() -> None:
        storage = FileBlockStorage(tmp_path / "d.img", BS)
        try:
            await storage.apply([block])
        finally:
            await storage.close()

    with pytest.raises(PlayerError, match=message) as err:
        run(go())
    assert f"sequence {block.sequence}" in str(err.value)


def test_file_random_batches_match_a_model(tmp_path: Path) -> None:
    rng = random.Random(5)
    blocks = []
    for seq in range(3000):
        index = rng.choice([rng.randrange(64), rng.randrange(1 << 16)])
        if rng.random() < 0.2:
            blocks.append(delb(seq, index))
        else:
            blocks.append(setb(seq, index, rng.randbytes(rng.choice([BS, 100]))))

    async def go() -> dict[int, bytes]:
        storage = FileBlockStorage(tmp_path / "d.img", BS)
        try:
            for start in range(0, len(blocks), 37):
                await storage.apply(blocks[start:start + 37])
            return await contents(storage, sorted({b.index for b in blocks}))
        finally:
            await storage.close()

    assert run(go()) == model(blocks)


# ---------------------------------------------------------------------------------------------
# Redis block store


def test_redis_block_store(redis_factory: RedisFactory) -> None:
    (server,) = redis_factory(1)
    rng = random.Random(2)
    blocks = [setb(s, rng.randrange(50), rng.randbytes(BS)) if rng.random() < 0.8
              else delb(s, rng.randrange(50)) for s in range(400)]

    async def go() -> dict[int, bytes]:
        storage = RedisBlockStorage(ServerAddress(server.host, server.port, 2), "vd:", BS)
        try:
            for start in range(0, len(blocks), 25):
                await storage.apply(blocks[start:start + 25])
            return await contents(storage, range(50))
        finally:
            await storage.close()

    got = run(go())
    expected = model(blocks)
    assert got == {i: expected.get(i, bytes(BS)) for i in range(50)}
    client = server.client(db=2)
    live = set(image_of(blocks))
    assert {int(k[3:]) for k in client.keys(b"vd:*")} == live


def test_redis_block_store_down_is_a_player_error(redis_factory: RedisFactory) -> None:
    (server,) = redis_factory(1)
    server.stop()

    async def go() -> None:
        storage = RedisBlockStorage(ServerAddress(server.host, server.port), "p:", BS,
                                    timeout=2.0)
        try:
            await storage.apply([setb(0, 0, b"x")])
        finally:
            await storage.close()

    with pytest.raises(PlayerError, match=server.address.split(":")[1]):
        run(go())


# ---------------------------------------------------------------------------------------------
# Replays


def replay(servers: Sequence[RedisProcess], path: Path, limiter: Limiter | None = None,
           **kwargs: Any) -> tuple[Any, list[int]]:
    seen: list[int] = []

    async def go() -> Any:
        pool = pool_of(servers)
        storage = FileBlockStorage(path, BS)
        try:
            reader = ChainReader(pool, VDISK, v2_opener(), limiter)
            return await Player(storage, on_sequence=seen.append, **kwargs).play(reader)
        finally:
            await storage.close()
            await pool.close()

    return run(go()), seen


def image_bytes(path: Path) -> dict[int, bytes]:
    data = path.read_bytes()
    out = {}
    for i in range(len(data) // BS):
        block = data[i * BS:(i + 1) * BS]
        if block != bytes(BS):
            out[i] = block
    return out


def test_replay_calls_back_every_sequence_once_in_order(redis6: list[RedisProcess],
                                                        tmp_path: Path) -> None:
    w = ChainWriter(redis6)
    blocks = w.write(200, 25, indexes=300)
    w.append(blocks[175:])  # a re-flush after a crash
    items: list[int] = []
    result, seen = replay(redis6, tmp_path / "d.img",
                          on_item=lambda item, res: items.append(res.blocks))
    assert seen == list(range(200))
    assert items == [25 * (i + 1) for i in range(8)] + [200]
    assert (result.aggregations, result.blocks, result.duplicates) == (9, 200, 25)
    deletes = sum(1 for b in blocks if b.operation == 2)
    assert (result.sets, result.deletes) == (200 - deletes, deletes)
    assert (result.first_sequence, result.last_sequence) == (0, 199)
    assert result.last_timestamp == blocks[-1].timestamp
    assert image_bytes(tmp_path / "d.img") == image_of(blocks)


def test_rollback_to_a_sequence_and_to_a_timestamp(redis6: list[RedisProcess],
                                                  tmp_path: Path) -> None:
    w = ChainWriter(redis6)
    blocks = w.write(300, 25, indexes=200)
    result, seen = replay(redis6, tmp_path / "s.img", Limiter(end_seq=137))
    assert seen == list(range(138)) and result.last_sequence == 137
    assert result.outside == 12  # the rest of the aggregation holding 137
    assert image_bytes(tmp_path / "s.img") == image_of(blocks[:138])
    when = blocks[211].timestamp
    result, seen = replay(redis6, tmp_path / "t.img", Limiter(end_ts=when))
    assert seen == list(range(212))
    assert image_bytes(tmp_path / "t.img") == image_of(blocks[:212])


def test_restore_helper_into_redis(redis6: list[RedisProcess],
                                   redis_factory: RedisFactory) -> None:
    w = ChainWriter(redis6)
    blocks = w.write(100, 20, indexes=40)
    (store,) = redis_factory(1)

    async def go() -> dict[int, bytes]:
        pool = pool_of(redis6)
        storage = RedisBlockStorage(ServerAddress(store.host, store.port), f"{VDISK}:", BS)
        try:
            result = await restore(pool, VDISK, v2_opener(), storage, end_seq=59)
            assert result.last_sequence == 59
            return {i: await storage.read(i) for i in range(40)}
        finally:
            await storage.close()
            await pool.close()

    got = run(go())
    expected = image_of(blocks[:60])
    assert got == {i: expected.get(i, bytes(BS)) for i in range(40)}


def test_replay_stops_at_the_first_bad_aggregation_after_applying_the_good_ones(
        redis6: list[RedisProcess], tmp_path: Path) -> None:
    w = ChainWriter(redis6)
    good = w.write(50, 25)
    bad = make_blocks(50, 25)
    bad[3] = Block(bad[3].sequence, bad[3].index, bad[3].timestamp, 1, bytes(32), b"z" * BS)
    w.append(bad)
    seen: list[int] = []

    async def go() -> None:
        pool = pool_of(redis6)
        storage = FileBlockStorage(tmp_path / "d.img", BS)
        try:
            await restore(pool, VDISK, v2_opener(), storage, on_sequence=seen.append)
        finally:
            await storage.close()
            await pool.close()

    with pytest.raises(DecodeError):
        run(go())
    assert seen == [b.sequence for b in good]  # nothing of the bad one was applied
