"""Stored records: the v2-layout seal (v3 and v2 records), tamper detection, and the hand-laid
aggregation encoding."""

from __future__ import annotations

import asyncio
import os
import random
import threading
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest

from tlog.protocol import block_hash
from tlog.protocol.wire import Block
from tlog.record import layout
from tlog.record.aggregation import (
    NONCE_SIZE,
    SEAL_STEP,
    CheckpointMark,
    Keyring,
    MissingKeyError,
    RecordError,
    RecordOpener,
    SealedRecord,
    V2Writer,
    open_v2,
    parse_v2_header,
)
from tlog.record.crypto import VdiskCipher
from tlog.record.erasure import ErasureCoder
from tlog.record.keying import record_key
from tlog.record.pieces import fetch_record
from tlog.record.steps import OFFLOAD_BYTES, Steps, Work, off_loop, run_now, run_stepped
from tlog.storage import RedisStorageServer, ServerAddress, StoragePool

from .wireclient import capnp_aggregation

KEY = b"k" * 32
T = TypeVar("T")


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
    assert sealed.hash == record_key(sealed.record)
    head = parse_v2_header(sealed.record)
    assert (head.first_sequence, head.last_sequence, head.count) == (0, 24, 25)
    assert head.vdisk_id == "vd" and head.prev == bytes(32) and head.timestamp == 123
    agg = open_v2(sealed.record, Keyring.of(KEY), sealed.hash)
    assert agg.blocks == bs
    assert (agg.prev, agg.vdisk_id, agg.timestamp) == (bytes(32), "vd", 123)


def _content(record: bytes, cipher: VdiskCipher) -> tuple[Any, bytes]:
    """A v2 record's header and the compressed plaintext it seals: all of it but the random
    nonce (and the ciphertext and tag, which follow from the nonce and these)."""
    head = parse_v2_header(record)
    view = memoryview(record)
    nonce = bytes(view[head.size:head.size + NONCE_SIZE])
    return head, bytes(cipher.open(nonce, view[head.size + NONCE_SIZE:], view[:head.size]))


async def _turns_while(job: Awaitable[T]) -> tuple[T, int]:
    """``job``'s result and how many turns a task scheduled next to it got meanwhile."""
    turns = 0
    done = False

    async def probe() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(probe())
    await asyncio.sleep(0)  # the probe is running
    turns = 0
    try:
        result = await job
    finally:
        done = True
        await task
    return result, turns


def random_blocks(n: int, size: int) -> list[Block]:
    out = []
    for seq in range(n):
        data = os.urandom(size)
        out.append(Block(seq, seq * 7, 1_700_000_000_000_000_000 + seq, 1, block_hash(data),
                         data))
    return out


@pytest.mark.parametrize(("count", "size"), [(200, 4096), (40, 65536)])
@pytest.mark.parametrize("checkpoint", [False, True], ids=["aggregation", "checkpoint"])
def test_sealing_in_steps_lets_the_loop_run_and_gives_the_record_seal_gives(
        count: int, size: int, checkpoint: bool) -> None:
    """A large aggregation or checkpoint part sealed in steps lets a task next to it run
    between the steps (the copy of the plaintext alone takes one per `SEAL_STEP`), and is
    the record sealed in one go, byte for byte but for its random nonce: same header, same
    compressed plaintext under the tag, same length, a hash that is its key. 2.6 MB of
    64 KiB blocks also has its biggest steps run in a thread (`OFFLOAD_BYTES`)."""
    writer = V2Writer(KEY, "vd")
    bs = random_blocks(count, size)
    mark = CheckpointMark(1, 3, os.urandom(32), ((0, 99),))

    def steps() -> Steps[SealedRecord]:
        if checkpoint:
            return writer.seal_checkpoint_in_steps(bytes(32), mark, bs, 99, 7, epoch=2)
        return writer.seal_in_steps(bytes(32), bs, timestamp=7, epoch=2)

    stepped, turns = asyncio.run(_turns_while(run_stepped(steps())))
    assert turns >= count * size // SEAL_STEP
    whole = (writer.seal_checkpoint(bytes(32), mark, bs, 99, 7, epoch=2) if checkpoint
             else writer.seal(bytes(32), bs, timestamp=7, epoch=2))
    here = run_now(steps())  # the same steps, all at once
    cipher = VdiskCipher(KEY, "vd")
    expected = _content(whole.record, cipher)
    for sealed in (stepped, here):
        assert _content(sealed.record, cipher) == expected
        assert len(sealed.record) == len(whole.record)
        assert sealed.hash == record_key(sealed.record)
        assert (sealed.first_sequence, sealed.last_sequence, sealed.sequences) == (
            whole.first_sequence, whole.last_sequence, whole.sequences)
    agg = open_v2(stepped.record, Keyring.of(KEY), stepped.hash)
    assert agg.blocks == bs and agg.epoch == 2 and agg.checkpoint == (
        mark if checkpoint else None)


def test_a_small_aggregation_is_sealed_in_a_single_step() -> None:
    small = V2Writer(KEY, "vd").seal_in_steps(bytes(32), blocks(5), timestamp=7)
    with pytest.raises(StopIteration):
        next(small)


def test_stepped_work_runs_large_pieces_in_a_thread_and_small_ones_on_the_loop() -> None:
    """`run_stepped` and `off_loop` hand work over `OFFLOAD_BYTES` to a worker thread (the
    loop goes on meanwhile) and do smaller work at once; `run_now` does all of it here."""
    here = threading.get_ident()

    def where(tag: str) -> tuple[str, int]:
        return tag, threading.get_ident()

    def job() -> Steps[list[tuple[str, int]]]:
        seen = [(yield Work(where, ("small",), OFFLOAD_BYTES))]
        yield None
        seen.append((yield Work(where, ("large",), OFFLOAD_BYTES + 1)))
        return seen

    async def scenario() -> tuple[list[tuple[str, int]], int, int]:
        stepped = await run_stepped(job())
        small = await off_loop(threading.get_ident, size=10)
        large = await off_loop(threading.get_ident, size=OFFLOAD_BYTES + 1)
        return stepped, small, large

    stepped, small, large = asyncio.run(scenario())
    assert stepped[0] == ("small", here) and stepped[1][0] == "large"
    assert stepped[1][1] != here and large != here and small == here
    assert run_now(job()) == [("small", here), ("large", here)]


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


@pytest.mark.parametrize("version", [3, 2], ids=["v3", "v2"])
def test_any_changed_byte_is_detected(version: int) -> None:
    sealed = V2Writer(KEY, "vd", version).seal(bytes(32), blocks(3), timestamp=5)
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
    assert record_key(coder.decode([bytes(bad) if i == 1 else p
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
    ours = layout.encode_aggregation("The Go Tlog", 77, "vdisk-x", prev, bs)
    assert capnp_aggregation(bs, prev, "The Go Tlog", 77, "vdisk-x") == ours
    parsed = layout.parse_aggregation(memoryview(ours)[8:])
    assert parsed is not None and parsed.blocks == bs and parsed.prev == prev
    assert parsed.epoch == 0
    # An epoch (our field @6) adds a data word, laid out as pycapnp does with our schema.
    with_epoch = layout.encode_aggregation("The Go Tlog", 77, "vdisk-x", prev, bs, seed + 3)
    assert capnp_aggregation(bs, prev, "The Go Tlog", 77, "vdisk-x", seed + 3) == with_epoch
    parsed = layout.parse_aggregation(memoryview(with_epoch)[8:])
    assert parsed is not None and parsed.blocks == bs and parsed.epoch == seed + 3
