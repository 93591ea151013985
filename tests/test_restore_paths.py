"""The fast paths of the read side, checked against the slow ones they replace: the walk
back by server 0's script against the piece-by-piece walk, the canonical aggregation parser
against pycapnp and the generic parser, runs of writes into an image against a model, and
the sequence set's bulk insert against plain adds."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
import redis

from tlog.protocol import block_hash, wire
from tlog.protocol.wire import Block
from tlog.read.chain import ChainReader
from tlog.read.fetch import FIRST_HEADER_RUN
from tlog.read.limiter import Limiter, SequenceSet
from tlog.read.player import _MAX_IOV, FileBlockStorage
from tlog.record import layout
from tlog.record.aggregation import LegacyWriter
from tlog.record.pieces import DecodeError
from tlog.storage import RedisStorageServer, ServerAddress, StoragePool

from .redis_fixture import RedisFactory, RedisProcess
from .test_decoder import ChainWriter, applied, make_blocks, pool_of, run, v2_opener
from .wireclient import capnp_aggregation


def commands(server: RedisProcess) -> dict[str, int]:
    """Calls per command so far (INFO commandstats)."""
    stats = server.client().info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


async def walk(servers: list[RedisProcess], scripting: bool = True,
               limiter: Limiter | None = None) -> tuple[list[Any], list[Any]]:
    """(links, items) of one read; ``scripting`` False forces the piece-by-piece walk."""
    pool = pool_of(servers)
    try:
        reader = ChainReader(pool, "vd1", v2_opener(), limiter)
        reader._reader.scripting = scripting
        links = await reader.walk()
        items = [item async for item in reader.items()]
        return links, items
    finally:
        await pool.close()


def write_sets(w: ChainWriter, aggregations: int, per_agg: int) -> list[Block]:
    """Aggregations of sets only (no record small enough to hide its header)."""
    rng = random.Random(aggregations)
    out: list[Block] = []
    for first in range(0, aggregations * per_agg, per_agg):
        blocks = []
        for seq in range(first, first + per_agg):
            data = rng.randbytes(512)
            blocks.append(Block(seq, rng.randrange(100), seq, 1, block_hash(data), data))
        w.append(blocks)
        out += blocks
    return out


def test_walk_by_script_reads_headers_in_a_few_round_trips(redis6: list[RedisProcess]) -> None:
    w = ChainWriter(redis6)
    count = 3 * FIRST_HEADER_RUN + 5  # several runs of the script, each twice as long
    blocks = write_sets(w, count, 2)
    before = commands(redis6[0])
    links, items = run(walk(redis6))
    after = commands(redis6[0])
    assert [link.key for link in links] == [s.hash for s in w.chain]
    assert applied(items) == blocks
    evals = after.get("eval", 0) - before.get("eval", 0)
    assert 1 <= evals <= 4
    # one piece read on its own (the head's, found whole): the walk went by the script,
    # the replay by MGET
    assert after.get("get", 0) - before.get("get", 0) == 1
    slow_links, slow_items = run(walk(redis6, scripting=False))
    assert [(x.key, x.prev, x.first_sequence, x.last_sequence, x.count) for x in slow_links] == [
        (x.key, x.prev, x.first_sequence, x.last_sequence, x.count) for x in links]
    assert applied(slow_items) == blocks


def test_walk_by_script_past_records_too_small_for_a_header(
        redis6: list[RedisProcess]) -> None:
    """Aggregations of deletes only are so small that piece 0 cannot hold the header: the
    script stops there, the walk reads those whole and goes on with the script."""
    w = ChainWriter(redis6)
    blocks = w.write(400, 2)  # some aggregations are two deletes
    links, items = run(walk(redis6))
    assert [link.key for link in links] == [s.hash for s in w.chain]
    assert applied(items) == blocks


def test_walk_by_script_with_a_start_limit(redis6: list[RedisProcess]) -> None:
    w = ChainWriter(redis6)
    blocks = w.write(300, 3)
    links, items = run(walk(redis6, limiter=Limiter(start_seq=150)))
    assert applied(items) == blocks[150:]
    assert links[0].first_sequence <= 150 < links[0].first_sequence + 3


def test_walk_goes_on_piece_by_piece_where_the_script_stops(redis6: list[RedisProcess]) -> None:
    """Piece 0 of one record lost: the script stops there, the walk reads that record from
    the other pieces and continues (by piece, once the script has nothing to say)."""
    w = ChainWriter(redis6)
    blocks = w.write(200, 2)
    redis6[0].client().delete(w.chain[40].hash)
    links, items = run(walk(redis6))
    assert [link.key for link in links] == [s.hash for s in w.chain]
    assert applied(items) == blocks
    assert items[40].missing == [0]


def test_walk_without_scripting_on_the_server(redis_factory: RedisFactory) -> None:
    servers = redis_factory(6, rename_command=["EVAL", '""'])
    with pytest.raises(redis.ResponseError):
        servers[0].client().eval("return 1", 0)
    w = ChainWriter(servers)
    blocks = w.write(100, 2)
    links, items = run(walk(servers))
    assert [link.key for link in links] == [s.hash for s in w.chain]
    assert applied(items) == blocks


# ---------------------------------------------------------------------------------------------
# Parsing



@pytest.mark.parametrize("seed", range(4))
def test_canonical_parse_matches_pycapnp_layouts(seed: int) -> None:
    rng = random.Random(seed)
    blocks = make_blocks(rng.randrange(1000), rng.randrange(1, 60), seed=seed,
                         block_size=rng.choice([7, 512, 4096]))
    prev = os.urandom(32)
    for framed in (layout.encode_aggregation("tlog", 5, "v", prev, blocks),
                   capnp_aggregation(blocks, prev)):
        header = wire.parse_frame_header(framed, 0, len(framed), len(framed))
        assert header is not None and len(header.segment_sizes) == 1
        parsed = layout.parse_aggregation(
            memoryview(framed)[header.header_len:header.header_len + header.body_len])
        assert parsed is not None
        assert parsed.blocks == blocks and parsed.prev == prev and parsed.vdisk_id == "v"


def test_canonical_parse_refuses_pointers_out_of_the_segment() -> None:
    blocks = make_blocks(0, 3, block_size=64)
    framed = bytearray(layout.encode_aggregation("tlog", 5, "v", bytes(32), blocks))
    seg = memoryview(framed)[8:]
    good = layout.parse_aggregation(seg)
    assert good is not None and good.blocks == blocks
    # The last block's data pointer (word 5 of its element): make it point far beyond.
    tag_words = len(seg) // 8
    for word in range(tag_words):
        value = int.from_bytes(seg[word * 8:word * 8 + 8], "little")
        if value & 0x7_0000_0003 == 0x2_0000_0001 and value >> 35 == 64:
            last = word
    value = int.from_bytes(seg[last * 8:last * 8 + 8], "little")
    seg[last * 8:last * 8 + 8] = ((value & ~(0x3FFFFFFF << 2)) | (0x1000 << 2)).to_bytes(
        8, "little")
    assert layout.parse_aggregation(seg) is None


# ---------------------------------------------------------------------------------------------
# Writing the image


def test_long_runs_short_blocks_and_deletes_land_as_a_model_says(tmp_path: Path) -> None:
    bs = 4096
    rng = random.Random(3)
    blocks: list[Block] = []
    seq = 0
    for start in (0, 5000, 2 * _MAX_IOV + 3):  # runs longer than one pwritev takes
        for index in range(start, start + _MAX_IOV + 7):
            data = rng.randbytes(bs if rng.random() < 0.9 else rng.randrange(1, bs))
            if rng.random() < 0.05:
                blocks.append(Block(seq, index, 0, 2, block_hash(b""), b""))
            else:
                blocks.append(Block(seq, index, 0, 1, block_hash(data), data))
            seq += 1
    model: dict[int, bytes] = {}
    for b in blocks:
        if b.operation == 1:
            model[b.index] = bytes(b.data).ljust(bs, b"\0")
        else:
            model.pop(b.index, None)

    async def go() -> dict[int, bytes]:
        storage = FileBlockStorage(tmp_path / "image", bs)
        try:
            for at in range(0, len(blocks), 700):
                await storage.apply(blocks[at:at + 700])
            return {i: await storage.read(i) for i in {b.index for b in blocks}}
        finally:
            await storage.close()

    got = run(go())
    assert got == {i: model.get(i, bytes(bs)) for i in got}


# ---------------------------------------------------------------------------------------------
# Sequences replayed


@pytest.mark.parametrize("sequences", [
    [10, 11, 12, 13], [10, 12, 11, 13], [10, 10, 11], [10, 12, 14], [7], [10, 11, 13, 12, 14],
])
def test_bulk_insert_equals_one_by_one(sequences: list[int]) -> None:
    for before in ([], [1, 2, 3], [6], [9], [5, 9]):
        if before and max(before) >= min(sequences):
            continue  # add_new is for sequences above all the set holds
        bulk, single = SequenceSet(), SequenceSet()
        for seq in before:
            bulk.add(seq)
            single.add(seq)
        bulk.add_new(list(sequences), min(sequences))
        for seq in sequences:
            single.add(seq)
        assert bulk.ranges == single.ranges


# ---------------------------------------------------------------------------------------------
# Records opened in worker processes


async def read_with(servers: list[RedisProcess], processes: bool, opener: Any = None,
                    limiter: Limiter | None = None, vdisk: str = "vd1",
                    ) -> tuple[list[Any], ChainReader]:
    pool = pool_of(servers)
    try:
        reader = ChainReader(pool, vdisk, opener or v2_opener(), limiter, processes=processes,
                             workers=2, prefetch=8)
        items = [item async for item in reader.items()]
        return items, reader
    finally:
        await pool.close()


def summary_of(items: list[Any]) -> list[tuple[Any, ...]]:
    """What a replay yields, comparable across the two paths."""
    return [(i.aggregation.hash, i.aggregation.prev, i.aggregation.timestamp,
             i.aggregation.record_size, i.aggregation.compressed_size, i.aggregation.format,
             i.blocks, i.duplicates, i.missing, i.corrupt) for i in items]


def test_worker_processes_yield_what_threads_yield(redis6: list[RedisProcess]) -> None:
    w = ChainWriter(redis6)
    w.write(600, 5)
    in_processes, _ = run(read_with(redis6, True))
    in_threads, _ = run(read_with(redis6, False))
    assert summary_of(in_processes) == summary_of(in_threads)
    assert [i.aggregation.hash for i in in_processes] == [s.hash for s in w.chain]


def test_worker_processes_leave_damaged_records_to_the_parent(
        redis6: list[RedisProcess]) -> None:
    """A lost piece, a corrupt piece, a record under the wrong key: the workers hand them
    back unopened, the parent rebuilds the first two from parity and names the third."""
    w = ChainWriter(redis6)
    blocks = w.write(300, 5)
    redis6[1].client().delete(w.chain[7].hash)
    damaged = bytearray(w.chain[20].pieces[2])
    damaged[100] ^= 1
    redis6[2].client().set(w.chain[20].hash, bytes(damaged))
    items, _ = run(read_with(redis6, True))
    assert applied(items) == blocks
    assert items[7].missing == [1] and items[20].corrupt == [2]
    # a record swapped for another one of the chain: its hash is not its key
    for server, piece in zip(redis6, w.chain[41].pieces, strict=True):
        server.client().set(w.chain[40].hash, piece)
    with pytest.raises(DecodeError) as err:
        run(read_with(redis6, True))
    assert w.chain[40].hash.hex() in str(err.value)


def test_worker_processes_give_way_when_a_data_server_is_down(
        redis6: list[RedisProcess]) -> None:
    w = ChainWriter(redis6)
    blocks = w.write(300, 5)

    async def go() -> list[Any]:
        pool = pool_of(redis6)
        try:
            reader = ChainReader(pool, "vd1", v2_opener(), processes=True, workers=2,
                                 prefetch=8)
            await reader.walk()
            redis6[3].stop()  # after the walk: the workers meet it first
            return [item async for item in reader.items()]
        finally:
            await pool.close()

    items = run(go())
    assert applied(items) == blocks
    # all but the head, which the walk read whole before the server went away
    assert all(i.missing == [3] for i in items[:-1]) and items[-1].missing == []


def test_worker_processes_open_legacy_records(redis6: list[RedisProcess]) -> None:
    from .test_decoder import KEY, NONCE, legacy_opener

    w = ChainWriter(redis6, writer=LegacyWriter(KEY, NONCE, "vd1"))
    blocks = w.write(200, 4)
    items, _ = run(read_with(redis6, True, legacy_opener()))
    assert applied(items) == blocks
    assert {i.aggregation.format for i in items} == {"legacy"}


def test_batches_are_cut_by_count_and_by_size() -> None:
    from tlog.read.links import BATCH, BATCH_BYTES, BLOCK_ESTIMATE, ChainLink, cut_batches

    def links(count: int, blocks: int) -> list[ChainLink]:
        return [ChainLink(bytes([i % 256]) * 32, bytes(32), 0, 0, blocks, 0)
                for i in range(count)]

    small = cut_batches(links(100, 25), BATCH)
    assert [len(b) for b in small] == [32, 32, 32, 4]
    big = cut_batches(links(20, 250), BATCH)
    per_batch = BATCH_BYTES // (250 * BLOCK_ESTIMATE)
    assert all(len(b) <= per_batch for b in big) and sum(len(b) for b in big) == 20
    assert [len(b) for b in cut_batches(links(3, 100_000), BATCH)] == [1, 1, 1]


def test_plaintexts_too_big_for_the_shared_slot_come_through_the_pipe(
        redis6: list[RedisProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    from tlog.read import bulkread

    monkeypatch.setattr(bulkread, "SLOT_BYTES", 40_000)  # a few records per slot
    w = ChainWriter(redis6)
    blocks = w.write(400, 5)
    in_processes, _ = run(read_with(redis6, True))
    assert applied(in_processes) == blocks
    assert [i.aggregation.hash for i in in_processes] == [s.hash for s in w.chain]


def test_walk_script_and_workers_log_in_to_servers_with_a_password(
        redis_factory: RedisFactory) -> None:
    servers = redis_factory(6, requirepass="s3cret")
    w = ChainWriter(servers)
    blocks = w.write(400, 5)
    before = commands(servers[0])

    async def go() -> list[Any]:
        pool = StoragePool([RedisStorageServer(ServerAddress(s.host, s.port, password="s3cret"),
                                               socket_timeout=5.0) for s in servers], 4, 2)
        try:
            reader = ChainReader(pool, "vd1", v2_opener(), processes=True, workers=2,
                                 prefetch=8)
            return [item async for item in reader.items()]
        finally:
            await pool.close()

    items = run(go())
    assert applied(items) == blocks
    after = commands(servers[0])
    assert after.get("eval", 0) > before.get("eval", 0)  # the walk went by the script
    # one MGET per batch of 8 (prefetch=8), all by the workers: the parent read none itself
    assert after.get("mget", 0) - before.get("mget", 0) == -(-len(w.chain) // 8)
