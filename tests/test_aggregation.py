"""Stored records: the v2 seal, tamper detection, and the hand-laid aggregation encoding."""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import pytest

from tlog.protocol import block_hash, wire
from tlog.protocol.wire import Block
from tlog.read.fetch import fetch_record
from tlog.record.aggregation import (
    Keyring,
    MissingKeyError,
    RecordError,
    RecordOpener,
    V2Writer,
    open_v2,
    parse_v2_header,
    record_hash,
)
from tlog.record.erasure import ErasureCoder
from tlog.storage import RedisStorageServer, ServerAddress, StoragePool

from .wireclient import capnp_aggregation

KEY = b"k" * 32


def blocks(n: int, seed: int = 0) -> list[Block]:
    rng = random.Random(seed)
    out = []
    for seq in range(n):
        data = rng.randbytes(4096) if seq % 3 else bytes(4096)
        out.append(Block(seq, rng.randrange(1 << 20), 1_700_000_000_000_000_000 + seq,
                         1 if seq % 5 else 2, block_hash(data), data))
    return out


def test_v2_roundtrip_and_header() -> None:
    bs = blocks(25)
    sealed = V2Writer(KEY, "vd").seal(bytes(32), bs, timestamp=123)
    assert sealed.hash == record_hash(sealed.record)
    head = parse_v2_header(sealed.record)
    assert (head.first_sequence, head.last_sequence, head.count) == (0, 24, 25)
    assert head.vdisk_id == "vd" and head.prev == bytes(32) and head.timestamp == 123
    agg = open_v2(sealed.record, Keyring.of(KEY), sealed.hash)
    assert agg.blocks == bs
    assert (agg.prev, agg.vdisk_id, agg.timestamp) == (bytes(32), "vd", 123)


def test_sealing_in_steps_gives_the_record_seal_gives() -> None:
    """A large aggregation sealed in steps (the event loop runs between them) is the same
    record as one sealed at once, but for its random nonce: same header, same plaintext,
    a hash that is its key; a small one takes a single step."""
    writer = V2Writer(KEY, "vd")
    bs = [Block(b.sequence, b.index, b.timestamp, 1, block_hash(data), data)
          for b, data in ((b, os.urandom(4096)) for b in blocks(200))]
    steps = writer.seal_in_steps(bytes(32), bs, timestamp=7, epoch=2)
    yields = 0
    while True:
        try:
            next(steps)
            yields += 1
        except StopIteration as done:
            stepped = done.value
            break
    assert yields >= 4  # encode, compress, encryption and hash in parts
    whole = writer.seal(bytes(32), bs, timestamp=7, epoch=2)
    head, other = parse_v2_header(stepped.record), parse_v2_header(whole.record)
    assert head == other and len(stepped.record) == len(whole.record)
    assert stepped.hash == record_hash(stepped.record)
    agg = open_v2(stepped.record, Keyring.of(KEY), stepped.hash)
    assert agg.blocks == bs and agg.epoch == 2
    small = writer.seal_in_steps(bytes(32), blocks(5), timestamp=7)
    with pytest.raises(StopIteration):
        next(small)


def test_identical_content_gets_different_nonce_and_ciphertext() -> None:
    writer = V2Writer(KEY, "vd")
    bs = blocks(25)
    first = writer.seal(bytes(32), bs, timestamp=5)
    second = writer.seal(bytes(32), bs, timestamp=5)
    h1, h2 = parse_v2_header(first.record), parse_v2_header(second.record)
    nonce1 = first.record[h1.size:h1.size + 12]
    nonce2 = second.record[h2.size:h2.size + 12]
    assert nonce1 != nonce2
    assert first.record[h1.size + 12:] != second.record[h2.size + 12:]
    assert first.hash != second.hash


def test_any_changed_byte_is_detected() -> None:
    sealed = V2Writer(KEY, "vd").seal(bytes(32), blocks(3), timestamp=5)
    keyring = Keyring.of(KEY)
    for at in range(0, len(sealed.record), max(1, len(sealed.record) // 300)):
        bad = bytearray(sealed.record)
        bad[at] ^= 0x01
        with pytest.raises(RecordError):
            open_v2(bytes(bad), keyring, sealed.hash)
        with pytest.raises(RecordError):
            open_v2(bytes(bad), keyring)  # even without the expected hash: header is AAD


def test_wrong_vdisk_or_key() -> None:
    sealed = V2Writer(KEY, "vd").seal(bytes(32), blocks(2), timestamp=5)
    with pytest.raises(MissingKeyError, match="key id"):
        open_v2(sealed.record, Keyring.of(b"x" * 32))
    # a record moved to another vdisk's header does not open: the key is per vdisk
    other = V2Writer(KEY, "other").seal(bytes(32), blocks(2), timestamp=5)
    assert RecordOpener(Keyring.of(KEY), format="v2").open(other.record).vdisk_id == "other"


def test_flipped_byte_in_a_stored_piece_is_detected_and_repaired(redis6: list[Any]) -> None:
    sealed = V2Writer(KEY, "vd").seal(bytes(32), blocks(25), timestamp=5)
    coder = ErasureCoder(4, 2)
    pieces = coder.encode(sealed.record)
    for proc, piece in zip(redis6, pieces, strict=True):
        proc.client().set(sealed.hash, piece)
    bad = bytearray(pieces[1])
    bad[len(bad) // 2] ^= 0x80
    redis6[1].client().set(sealed.hash, bytes(bad))
    # a plain decode of the data pieces no longer matches the key...
    assert record_hash(coder.decode([bytes(bad) if i == 1 else p
                                     for i, p in enumerate(pieces)])) != sealed.hash

    async def read() -> bytes:
        pool = StoragePool([RedisStorageServer(ServerAddress.parse(r.address)) for r in redis6],
                           4, 2)
        try:
            return (await fetch_record(pool, sealed.hash)).record
        finally:
            await pool.close()

    # ...and the reader notices, and rebuilds the record from the other pieces.
    assert asyncio.run(read()) == sealed.record


@pytest.mark.parametrize("seed", range(5))
def test_hand_laid_aggregation_equals_pycapnp(seed: int) -> None:
    rng = random.Random(seed)
    bs = blocks(rng.randrange(0, 40), seed)
    for b in bs:
        cut = rng.choice([0, 1, 7, 4096])
        b.data = bytes(b.data)[:cut]
        b.hash = block_hash(b.data)
    prev = os.urandom(32)
    ours = wire.encode_aggregation("The Go Tlog", 77, "vdisk-x", prev, bs)
    assert capnp_aggregation(bs, prev, "The Go Tlog", 77, "vdisk-x") == ours
    parsed = wire.parse_aggregation(memoryview(ours)[8:])
    assert parsed is not None and parsed.blocks == bs and parsed.prev == prev
    assert parsed.epoch == 0
    # An epoch (our field @6) adds a data word, laid out as pycapnp does with our schema.
    with_epoch = wire.encode_aggregation("The Go Tlog", 77, "vdisk-x", prev, bs, seed + 3)
    assert capnp_aggregation(bs, prev, "The Go Tlog", 77, "vdisk-x", seed + 3) == with_epoch
    parsed = wire.parse_aggregation(memoryview(with_epoch)[8:])
    assert parsed is not None and parsed.blocks == bs and parsed.epoch == seed + 3
