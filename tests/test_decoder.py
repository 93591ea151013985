"""The chain reader (tlog.read) against real redis-server processes: the walk back, checks,
limiters, duplicates, parity rebuilds, and verify_chain.

The helpers at the top write chains straight into the servers the way tlogserver's flusher
does (piece i on server i under the record hash, LPUSH + LTRIM of the last-hash list); the
player and CLI tests import them.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from tlog.protocol import block_hash
from tlog.protocol.wire import Block
from tlog.read.chain import ChainReader, aggregations
from tlog.read.head import find_last
from tlog.read.limiter import Limiter, SequenceSet
from tlog.read.verify import verify_chain
from tlog.record.aggregation import (
    ZERO_HASH,
    Keyring,
    LegacyWriter,
    RecordOpener,
    SealedRecord,
    V2Writer,
)
from tlog.record.crypto import LegacyCipher
from tlog.record.erasure import ErasureCoder
from tlog.record.keying import V2_VERSION
from tlog.record.pieces import DecodeError, fetch_record
from tlog.storage import RedisStorageServer, ServerAddress, StoragePool, last_hash_key

from .redis_fixture import RedisProcess

T = TypeVar("T")

KEY = b"12345678901234567890123456789012"
NONCE = bytes.fromhex("37b8e8a308c354048d245f6d")
VDISK = "vd1"
TS0 = 1_700_000_000_000_000_000


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Drive one coroutine to completion (pytest-asyncio is not used in this suite)."""
    return asyncio.run(coro)


def v2_opener(key: bytes = KEY) -> RecordOpener:
    return RecordOpener(Keyring.of(key), None, "v2")


def legacy_opener() -> RecordOpener:
    return RecordOpener(Keyring.of(KEY), LegacyCipher(KEY, NONCE), "legacy")


def make_blocks(first: int, count: int, *, seed: int = 0, indexes: int = 1000,
                block_size: int = 4096, ts_step: int = 1000) -> list[Block]:
    """``count`` blocks from sequence ``first``: random sets (some deletes) on random indexes,
    timestamps rising with the sequence."""
    rng = random.Random(seed * 1_000_003 + first)
    out = []
    for seq in range(first, first + count):
        if rng.random() < 0.15:
            data, op = b"", 2
        else:
            data, op = rng.randbytes(block_size), 1
        out.append(Block(seq, rng.randrange(indexes), TS0 + seq * ts_step, op, block_hash(data),
                         data))
    return out


def pool_of(servers: Sequence[RedisProcess], k: int = 4, m: int = 2) -> StoragePool:
    """A pool that owns its clients (close it with ``await pool.close()``)."""
    return StoragePool([RedisStorageServer(ServerAddress(s.host, s.port), socket_timeout=5.0)
                        for s in servers], k, m)


@dataclass
class Stored:
    """One aggregation written by `ChainWriter`."""

    sealed: SealedRecord
    blocks: list[Block]
    pieces: list[bytes]

    @property
    def hash(self) -> bytes:
        return self.sealed.hash


class ChainWriter:
    """Writes a vdisk's chain straight into real servers, as the flusher lays it out."""

    def __init__(self, servers: Sequence[RedisProcess], vdisk: str = VDISK, *,
                 writer: V2Writer | LegacyWriter | None = None, k: int = 4, m: int = 2) -> None:
        self.servers = list(servers)
        self.vdisk = vdisk
        self.writer = writer or V2Writer(KEY, vdisk)
        self.coder = ErasureCoder(k, m)
        self.prev = ZERO_HASH
        self.chain: list[Stored] = []
        self.clients = [s.client() for s in self.servers]

    def seal(self, blocks: Sequence[Block], prev: bytes | None = None,
             timestamp: int | None = None) -> Stored:
        """Seal and encode without storing."""
        ts = timestamp if timestamp is not None else (
            max(b.timestamp for b in blocks) + 1 if blocks else TS0)
        sealed = self.writer.seal(self.prev if prev is None else prev, list(blocks), ts)
        return Stored(sealed, list(blocks), self.coder.encode(sealed.record))

    def store(self, stored: Stored, *, push: bool = True) -> Stored:
        for client, piece in zip(self.clients, stored.pieces, strict=True):
            client.set(stored.hash, piece)
            if push:
                client.lpush(last_hash_key(self.vdisk), stored.hash)
                client.ltrim(last_hash_key(self.vdisk), 0, 5)
        return stored

    def append(self, blocks: Sequence[Block], prev: bytes | None = None) -> Stored:
        """Seal, store and make it the head."""
        stored = self.store(self.seal(blocks, prev))
        self.chain.append(stored)
        self.prev = stored.hash
        return stored

    def write(self, total: int, per_agg: int = 25, *, first: int = 0, seed: int = 0,
              indexes: int = 1000) -> list[Block]:
        """Append ``total`` blocks from sequence ``first`` in aggregations of ``per_agg``."""
        out: list[Block] = []
        for start in range(first, first + total, per_agg):
            blocks = make_blocks(start, min(per_agg, first + total - start), seed=seed,
                                 indexes=indexes)
            self.append(blocks)
            out.extend(blocks)
        return out

    def close(self) -> None:
        for client in self.clients:
            client.close()


def image_of(blocks: Sequence[Block], block_size: int = 4096) -> dict[int, bytes]:
    """Block index -> content after applying ``blocks`` in order (deleted = absent)."""
    image: dict[int, bytes] = {}
    for b in blocks:
        if b.operation == 1:
            image[b.index] = bytes(b.data).ljust(block_size, b"\0")
        else:
            image.pop(b.index, None)
    return image


async def read_all(servers: Sequence[RedisProcess], opener: RecordOpener | None = None,
                   limiter: Limiter | None = None, vdisk: str = VDISK,
                   **kwargs: Any) -> tuple[list[Any], ChainReader]:
    pool = pool_of(servers)
    try:
        reader = ChainReader(pool, vdisk, opener or v2_opener(), limiter, **kwargs)
        items = [item async for item in reader.items()]
        return items, reader
    finally:
        await pool.close()


def applied(items: Sequence[Any]) -> list[Block]:
    return [b for item in items for b in item.blocks]


# ---------------------------------------------------------------------------------------------
# Pure parts


def test_sequence_set_merges_ranges() -> None:
    s = SequenceSet()
    for seq in [5, 6, 7, 1, 3, 2, 10, 9, 8, 20]:
        s.add(seq)
    assert s.ranges == [(1, 3), (5, 10), (20, 20)]
    s.add(4)
    assert s.ranges == [(1, 10), (20, 20)]
    s.add(4)
    assert s.ranges == [(1, 10), (20, 20)]
    assert 1 in s and 10 in s and 20 in s
    assert 0 not in s and 11 not in s and 19 not in s and 21 not in s
    assert s.max == 20 and len(s) == 11


def test_sequence_set_against_a_plain_set() -> None:
    rng = random.Random(7)
    s, plain = SequenceSet(), set()
    for _ in range(3000):
        seq = rng.randrange(400)
        s.add(seq)
        plain.add(seq)
        probe = rng.randrange(-2, 402)
        assert (probe in s) == (probe in plain)
    assert len(s) == len(plain)


def test_limiter_bounds_are_inclusive_and_zero_is_unbounded() -> None:
    def block(seq: int, ts: int) -> Block:
        return Block(seq, 0, ts, 1, b"", b"")

    assert Limiter().accepts(block(0, 0)) and Limiter().unbounded
    lim = Limiter(start_seq=10, end_seq=20)
    assert [s for s in range(30) if lim.accepts(block(s, 0))] == list(range(10, 21))
    lim = Limiter(start_ts=100, end_ts=200)
    assert lim.accepts(block(0, 100)) and lim.accepts(block(0, 200))
    assert not lim.accepts(block(0, 99)) and not lim.accepts(block(0, 201))
    both = Limiter(start_seq=5, end_ts=50)
    assert both.accepts(block(5, 50)) and not both.accepts(block(4, 10))
    assert not both.accepts(block(6, 51))
    with pytest.raises(ValueError):
        Limiter(start_seq=5, end_seq=4)
    with pytest.raises(ValueError):
        Limiter(start_ts=-1)


# ---------------------------------------------------------------------------------------------
# Reading chains back


def test_reads_every_aggregation_oldest_first_and_checks_it(redis6: list[RedisProcess]) -> None:
    w = ChainWriter(redis6)
    blocks = w.write(250, 25)
    items, reader = run(read_all(redis6))
    assert [i.aggregation.hash for i in items] == [s.hash for s in w.chain]
    assert applied(items) == blocks
    assert items[0].aggregation.prev == ZERO_HASH
    assert all(not i.missing and not i.corrupt and i.duplicates == 0 for i in items)
    assert reader.total_blocks == 250
    assert [(link.first_sequence, link.last_sequence) for link in reader.links] == [
        (s, s + 24) for s in range(0, 250, 25)]


def test_empty_vdisk_has_no_aggregations(redis6: list[RedisProcess]) -> None:
    items, reader = run(read_all(redis6))
    assert items == [] and reader.links == []


@pytest.mark.parametrize("cache_bytes", [0, 300_000])
def test_records_beyond_the_cache_are_read_again(redis6: list[RedisProcess],
                                                 cache_bytes: int) -> None:
    w = ChainWriter(redis6)
    blocks = w.write(400, 20)
    items, _ = run(read_all(redis6, cache_bytes=cache_bytes, prefetch=3))
    assert applied(items) == blocks


def test_head_is_the_highest_last_sequence_among_servers(redis6: list[RedisProcess]) -> None:
    w = ChainWriter(redis6)
    w.write(75, 25)
    # A server whose list points at an older aggregation first, and one with garbage first.
    c0, c1 = redis6[0].client(), redis6[1].client()
    c0.delete(last_hash_key(VDISK))
    c0.rpush(last_hash_key(VDISK), w.chain[1].hash, w.chain[0].hash)
    c1.lpush(last_hash_key(VDISK), b"\x07" * 32)
    pool = pool_of(redis6)

    async def head() -> Any:
        try:
            return await find_last(pool, VDISK, v2_opener())
        finally:
            await pool.close()

    assert run(head()).hash == w.chain[-1].hash


def test_rounds_cut_short_by_a_crash_are_not_the_head(redis6: list[RedisProcess]) -> None:
    """A writer killed while storing a vdisk's first rounds leaves them on fewer than k
    servers (piece and name): never acknowledged, they are skipped, and the chain is empty
    rather than unreadable. Once as many servers as k name one, its lost pieces are an
    error again."""
    w = ChainWriter(redis6)
    cut = [w.seal(make_blocks(0, 25)), w.seal(make_blocks(25, 25))]
    c0 = redis6[0].client()
    for stored in cut:  # only server 0 got its piece and the name
        c0.set(stored.hash, stored.pieces[0])
        c0.lpush(last_hash_key(VDISK), stored.hash)

    async def head() -> Any:
        pool = pool_of(redis6)
        try:
            return await find_last(pool, VDISK, v2_opener())
        finally:
            await pool.close()

    assert run(head()) is None
    items, _ = run(read_all(redis6))
    assert items == []
    # a real chain under the unfinished names: its head is found
    w.write(50, 25)
    c0.lpush(last_hash_key(VDISK), cut[0].hash)
    assert run(head()).hash == w.chain[-1].hash
    # named by k servers but with one piece: lost data, not an unfinished round
    for s in redis6[1:4]:
        s.client().delete(last_hash_key(VDISK))
        s.client().lpush(last_hash_key(VDISK), cut[1].hash)
    for s in redis6[:6]:
        s.client().delete(*[st.hash for st in w.chain])
    with pytest.raises(DecodeError, match="no last hash decodes"):
        run(head())


def test_two_servers_down_and_one_corrupt_piece_are_rebuilt(
        redis6: list[RedisProcess]) -> None:
    w = ChainWriter(redis6)
    blocks = w.write(100, 25)
    target = w.chain[2]
    redis6[5].client().setrange(target.hash, 10, b"\xff")
    items, _ = run(read_all(redis6))
    assert applied(items) == blocks
    assert items[2].corrupt == []  # parity is not even read while the data pieces hash right
    c = redis6[1].client()
    c.setrange(target.hash, 3, bytes([target.pieces[1][3] ^ 1]))
    items, _ = run(read_all(redis6))
    assert applied(items) == blocks
    assert items[2].corrupt == [1, 5]  # data piece damaged too: parity read, both named
    c.set(target.hash, target.pieces[1])
    redis6[5].client().set(target.hash, target.pieces[5])
    redis6[0].stop()
    redis6[3].stop()
    items, reader = run(read_all(redis6))
    assert applied(items) == blocks
    assert reader.down_servers == [0, 3]
    assert all(i.missing == [0, 3] for i in items)


def test_walk_by_headers_survives_a_corrupt_first_piece(redis6: list[RedisProcess]) -> None:
    """The walk reads v2 headers from piece 0 alone; a damaged prev there leads nowhere, so
    the aggregation is read whole (from parity) and the walk goes on by the checked prev."""
    w = ChainWriter(redis6)
    blocks = w.write(125, 25)
    target = w.chain[2]
    prev_at = 8 + 40  # length prefix, then the header's fixed fields before prev
    assert target.pieces[0][prev_at:prev_at + 32] == w.chain[1].hash
    redis6[0].client().setrange(target.hash, prev_at + 3, bytes([target.pieces[0][prev_at + 3]
                                                                 ^ 0x40]))
    items, reader = run(read_all(redis6))
    assert applied(items) == blocks
    assert items[2].corrupt == [0]
    assert [link.key for link in reader.links] == [s.hash for s in w.chain]
    # also when the walk stops on it (a start limit): the stop is decided on checked facts
    items, _ = run(read_all(redis6, limiter=Limiter(start_seq=60)))
    assert applied(items) == blocks[60:]


def test_too_many_pieces_lost_names_the_aggregation(redis6: list[RedisProcess]) -> None:
    w = ChainWriter(redis6)
    w.write(100, 25)
    target = w.chain[1]
    for s in redis6[:3]:
        s.client().delete(target.hash)
    with pytest.raises(DecodeError) as err:
        run(read_all(redis6))
    assert target.hash.hex() in str(err.value) and w.chain[2].hash.hex() in str(err.value)


def test_missing_aggregation_breaks_the_chain(redis6: list[RedisProcess]) -> None:
    w = ChainWriter(redis6)
    w.write(100, 25)
    for s in redis6:
        s.client().delete(w.chain[1].hash)
    with pytest.raises(DecodeError) as err:
        run(read_all(redis6))
    message = str(err.value)
    assert "not stored on any server" in message and w.chain[2].hash.hex() in message
    assert err.value.key == w.chain[2].hash


def test_record_under_the_wrong_key_is_refused(redis6: list[RedisProcess]) -> None:
    w = ChainWriter(redis6)
    w.write(75, 25)
    other = w.seal(make_blocks(25, 25, seed=9), prev=w.chain[0].hash)
    for client, piece in zip(w.clients, other.pieces, strict=True):
        client.set(w.chain[1].hash, piece)  # a valid record, but not the one the key names
    with pytest.raises(DecodeError) as err:
        run(read_all(redis6))
    assert "hashes to its key" in str(err.value)


def test_wrong_key_fails_the_aead_check(redis6: list[RedisProcess]) -> None:
    ChainWriter(redis6).write(50, 25)
    with pytest.raises(DecodeError) as err:
        run(read_all(redis6, v2_opener(b"x" * 32)))
    assert "master key" in str(err.value)


def test_corrupt_block_hash_is_caught(redis6: list[RedisProcess]) -> None:
    w = ChainWriter(redis6)
    w.write(50, 25)
    bad = make_blocks(50, 25, seed=3)
    bad[4] = Block(bad[4].sequence, bad[4].index, bad[4].timestamp, 1, b"\0" * 32, b"x" * 4096)
    stored = w.append(bad)
    w.write(25, 25, first=75)
    with pytest.raises(DecodeError) as err:
        run(read_all(redis6))
    assert stored.hash.hex() in str(err.value) and "sequences 54" in str(err.value)


def test_aggregation_of_another_vdisk_is_refused(redis6: list[RedisProcess]) -> None:
    w = ChainWriter(redis6)
    w.write(25, 25)
    intruder = ChainWriter(redis6, "other")
    stored = intruder.seal(make_blocks(25, 25), prev=w.chain[0].hash)
    w.store(stored, push=False)
    w.append(make_blocks(50, 25), prev=stored.hash)
    with pytest.raises(DecodeError) as err:
        run(read_all(redis6))
    assert "belongs to vdisk 'other'" in str(err.value)


def test_duplicates_are_applied_once(redis6: list[RedisProcess]) -> None:
    """The server re-flushes the last aggregation after a crash: same sequences, same data,
    and a later write to the same index must not be undone by replaying the copy."""
    w = ChainWriter(redis6)
    first = make_blocks(0, 25, indexes=5)
    w.append(first)
    w.append(first)  # stored again after a crash, before the client saw FlushOK
    later = [Block(25 + i, b.index, b.timestamp + 10**9, 1, block_hash(b"n" * 4096), b"n" * 4096)
             for i, b in enumerate(first[:3])]
    w.append(later)
    w.append(first[20:])  # a partial re-flush of old sequences after newer ones
    items, _ = run(read_all(redis6))
    assert [i.duplicates for i in items] == [0, 25, 0, 5]
    assert applied(items) == first + later
    assert image_of(applied(items)) == image_of(first + later)


def test_sequence_limits(redis6: list[RedisProcess]) -> None:
    w = ChainWriter(redis6)
    blocks = w.write(200, 25)
    items, reader = run(read_all(redis6, limiter=Limiter(start_seq=60, end_seq=130)))
    assert applied(items) == blocks[60:131]
    # The walk stopped at the aggregation holding 60, the replay after the one holding 130.
    assert [link.first_sequence for link in reader.links] == [50, 75, 100, 125, 150, 175]
    assert [i.aggregation.first_sequence for i in items] == [50, 75, 100, 125]
    items, _ = run(read_all(redis6, limiter=Limiter(end_seq=24)))
    assert applied(items) == blocks[:25] and len(items) == 1
    items, _ = run(read_all(redis6, limiter=Limiter(start_seq=199)))
    assert applied(items) == blocks[199:]


def test_timestamp_limits(redis6: list[RedisProcess]) -> None:
    w = ChainWriter(redis6)
    blocks = w.write(200, 25)
    start, end = blocks[33].timestamp, blocks[150].timestamp
    items, reader = run(read_all(redis6, limiter=Limiter(start_ts=start, end_ts=end)))
    assert applied(items) == blocks[33:151]
    assert reader.links[0].first_sequence == 25  # walk stopped at the block with ts <= start
    both = Limiter(start_seq=40, end_ts=end)
    items, _ = run(read_all(redis6, limiter=both))
    assert applied(items) == blocks[40:151]


def test_aggregations_yields_whole_aggregations(redis6: list[RedisProcess]) -> None:
    w = ChainWriter(redis6)
    w.write(100, 25)
    pool = pool_of(redis6)

    async def collect() -> list[Any]:
        try:
            return [a async for a in aggregations(pool, VDISK, v2_opener(), start_seq=30,
                                                  end_seq=60)]
        finally:
            await pool.close()

    got = run(collect())
    assert [a.hash for a in got] == [s.hash for s in w.chain[1:3]]
    assert [len(a.blocks) for a in got] == [25, 25]


def test_legacy_chain_is_opened_once_on_the_walk(redis6: list[RedisProcess]) -> None:
    w = ChainWriter(redis6, writer=LegacyWriter(KEY, NONCE, VDISK))
    blocks = w.write(100, 25)
    items, reader = run(read_all(redis6, legacy_opener()))
    assert applied(items) == blocks
    assert all(i.aggregation.format == "legacy" for i in items)
    with pytest.raises(DecodeError):
        run(read_all(redis6, v2_opener()))
    auto = RecordOpener(Keyring.of(KEY), LegacyCipher(KEY, NONCE), "auto")
    assert applied(run(read_all(redis6, auto))[0]) == blocks


def test_mixed_formats_read_with_auto(redis6: list[RedisProcess]) -> None:
    """A vdisk moved from the legacy format to v2, then to v3 (BLAKE3 keys): the chain
    continues across formats, each record checked against its key by its own hash."""
    legacy = ChainWriter(redis6, writer=LegacyWriter(KEY, NONCE, VDISK))
    blocks = legacy.write(50, 25)
    w = ChainWriter(redis6, writer=V2Writer(KEY, VDISK, V2_VERSION))
    w.prev = legacy.prev
    blocks += w.write(50, 25, first=50)
    w.writer = V2Writer(KEY, VDISK)
    blocks += w.write(50, 25, first=100)
    auto = RecordOpener(Keyring.of(KEY), LegacyCipher(KEY, NONCE), "auto")
    items, _ = run(read_all(redis6, auto))
    assert applied(items) == blocks
    assert [i.aggregation.format for i in items] == ["legacy"] * 2 + ["v2"] * 2 + ["v3"] * 2
    assert [i.aggregation.hash for i in items] == [s.hash for s in legacy.chain + w.chain]


def test_fetch_record_reads_data_pieces_only_when_enough(redis6: list[RedisProcess]) -> None:
    w = ChainWriter(redis6)
    w.write(25, 25)
    redis6[4].stop()
    redis6[5].stop()
    pool = pool_of(redis6)

    async def fetch() -> Any:
        try:
            return await fetch_record(pool, w.chain[0].hash)
        finally:
            await pool.close()

    fetched = run(fetch())
    assert fetched.record == w.chain[0].sealed.record and not fetched.parity_read


# ---------------------------------------------------------------------------------------------
# verify_chain


def verify(servers: Sequence[RedisProcess], **kwargs: Any) -> Any:
    pool = pool_of(servers)

    async def go() -> Any:
        try:
            return await verify_chain(pool, VDISK, v2_opener(), **kwargs)
        finally:
            await pool.close()

    return run(go())


def test_verify_sound_chain_and_damaged_parity(redis6: list[RedisProcess]) -> None:
    w = ChainWriter(redis6)
    w.write(100, 25)
    report = verify(redis6)
    assert report.sound and not report.problems
    assert (report.aggregations, report.blocks) == (4, 100)
    assert (report.first_sequence, report.last_sequence) == (0, 99)
    redis6[4].client().setrange(w.chain[1].hash, 0, b"\x00\x01")
    redis6[5].client().delete(w.chain[2].hash)
    report = verify(redis6)
    assert report.sound
    assert [p.key for p in report.warnings] == [w.chain[1].hash, w.chain[2].hash]
    assert "corrupt on server 4" in report.warnings[0].message
    assert "missing on server 5" in report.warnings[1].message


def test_verify_reports_a_sequence_gap_and_an_orphan(redis6: list[RedisProcess]) -> None:
    w = ChainWriter(redis6)
    w.write(75, 25)
    w.append(make_blocks(75, 25), prev=w.chain[0].hash)  # skips the aggregations 25..74
    report = verify(redis6)
    assert not report.sound
    messages = [p.message for p in report.errors]
    assert any("not on the chain" in m and w.chain[2].hash.hex() in m for m in messages)
    assert any("sequences 25..74 are missing" in m for m in messages)
    report = verify(redis6, allow_gaps=True)
    assert [p.key for p in report.errors] == [w.chain[2].hash, w.chain[1].hash]
