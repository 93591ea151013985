"""Record keys by format: v3 records (the default) are stored under their BLAKE3-256, v2 and
legacy records under their BLAKE2b-256; a record is checked with the hash its own header
names and no other, and a chain may go on from v2 records to v3 ones (a server upgraded
mid-chain), which every reader walks: the player, verify, inspect, repair, compaction and
its checkpoints, slave sync."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import blake3
import pytest

from tlog.client import ThreadedClient
from tlog.read.repair import repair_vdisk
from tlog.record.aggregation import (
    Keyring,
    LegacyWriter,
    RecordError,
    RecordOpener,
    V2Writer,
    open_v2,
    parse_v2_header,
)
from tlog.record.crypto import LegacyCipher
from tlog.record.erasure import ErasureCoder
from tlog.record.keying import (
    V2_VERSION,
    V3_VERSION,
    blake2b_key,
    blake3_key,
    record_key,
    record_key_matches,
)
from tlog.record.pieces import DecodeError, PieceReader, fetch_record

from .redis_fixture import RedisFactory, RedisProcess
from .test_cli_read import (
    Client,
    image,
    read_args,
    send_shuffled,
    send_workload,
    tlog_cli,
    workload,
)
from .test_decoder import KEY, NONCE, VDISK, ChainWriter, make_blocks, pool_of, read_all, run
from .test_slave_sync import SIZE, WAIT, config_file, standby_image, start_server


def b2(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


def b3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def auto_opener() -> RecordOpener:
    return RecordOpener(Keyring.of(KEY), LegacyCipher(KEY, NONCE), "auto")


# ---------------------------------------------------------------------------------------------
# One record, one key


def test_v3_is_written_by_default_and_keyed_by_blake3() -> None:
    blocks = make_blocks(0, 25)
    sealed = V2Writer(KEY, VDISK).seal(bytes(32), blocks, timestamp=5)
    assert sealed.record[:5] == b"TLG2\x03"
    assert sealed.hash == b3(sealed.record) == record_key(sealed.record) != b2(sealed.record)
    assert parse_v2_header(sealed.record).version == V3_VERSION
    agg = open_v2(sealed.record, Keyring.of(KEY), sealed.hash)
    assert agg.format == "v3" and agg.hash == sealed.hash and agg.blocks == blocks
    # the digest is the size of a BLAKE2b-256 key: keys and prev links keep their size
    assert len(sealed.hash) == 32 and blake3_key(sealed.record) == sealed.hash


def test_v2_on_request_is_keyed_by_blake2b_and_read_alike() -> None:
    blocks = make_blocks(0, 25)
    sealed = V2Writer(KEY, VDISK, V2_VERSION).seal(bytes(32), blocks, timestamp=5)
    assert sealed.record[:5] == b"TLG2\x02"
    assert sealed.hash == b2(sealed.record) == record_key(sealed.record) != b3(sealed.record)
    for fmt in ("v3", "v2", "auto"):
        agg = RecordOpener(Keyring.of(KEY), None, fmt).open(sealed.record, sealed.hash)
        assert agg.format == "v2" and agg.blocks == blocks
    with pytest.raises(ValueError, match="record version 4"):
        V2Writer(KEY, VDISK, 4)


def test_legacy_records_keep_blake2b_keys() -> None:
    """0-Disk stores its records under their BLAKE2b, and expects ours so."""
    sealed = LegacyWriter(KEY, NONCE, VDISK).seal(bytes(32), make_blocks(0, 25), timestamp=5)
    assert sealed.hash == b2(sealed.record) == blake2b_key(sealed.record)
    for fmt in ("legacy", "auto"):
        opener = RecordOpener(Keyring.of(KEY), LegacyCipher(KEY, NONCE), fmt)
        assert opener.key_matches(sealed.record, sealed.hash)
        assert opener.open(sealed.record, sealed.hash).format == "legacy"
    # A legacy record is AES-GCM output: one in 2^40 starts like a v3 header. A reader of
    # legacy storage alone still keys it by BLAKE2b; one that may meet v3 records goes by
    # the header, and so refuses it (the price of one key per record).
    lookalike = b"TLG2\x03" + os.urandom(200)
    legacy_only = RecordOpener(Keyring.of(KEY), LegacyCipher(KEY, NONCE), "legacy")
    assert legacy_only.key_matches(lookalike, b2(lookalike))
    assert not auto_opener().key_matches(lookalike, b2(lookalike))
    assert auto_opener().key_matches(lookalike, b3(lookalike))


@pytest.mark.parametrize(("version", "other"), [(V3_VERSION, V2_VERSION),
                                                (V2_VERSION, V3_VERSION)])
def test_the_version_byte_cannot_be_switched(version: int, other: int) -> None:
    """Switching a record's version byte switches the hash its key is checked with, and
    the version is authenticated: the record opens under neither key."""
    sealed = V2Writer(KEY, VDISK, version).seal(bytes(32), make_blocks(0, 5), timestamp=5)
    switched = bytearray(sealed.record)
    switched[4] = other
    switched_record = bytes(switched)
    keyring = Keyring.of(KEY)
    assert not record_key_matches(switched_record, sealed.hash)
    with pytest.raises(RecordError, match="does not match its key"):
        open_v2(switched_record, keyring, sealed.hash)
    with pytest.raises(RecordError, match="authentication failed"):
        open_v2(switched_record, keyring, record_key(switched_record))


def test_a_v3_record_under_its_blake2b_key_is_refused() -> None:
    """Not accepted through either hash: BLAKE3 alone keys a record that says it is v3 (nor
    does the legacy fallback of an auto reader take it)."""
    sealed = V2Writer(KEY, VDISK).seal(bytes(32), make_blocks(0, 25), timestamp=5)
    wrong = b2(sealed.record)
    assert not record_key_matches(sealed.record, wrong)
    for opener in (auto_opener(), RecordOpener(Keyring.of(KEY), None, "v3"),
                   RecordOpener(Keyring.of(KEY), None, "v2")):
        assert not opener.key_matches(sealed.record, wrong)
        with pytest.raises(RecordError):
            opener.open(sealed.record, wrong)
    # A reader of legacy storage alone goes by BLAKE2b, but a v3 record is no legacy one.
    legacy_only = RecordOpener(Keyring.of(KEY), LegacyCipher(KEY, NONCE), "legacy")
    with pytest.raises(RecordError, match="authentication failed"):
        legacy_only.open(sealed.record, wrong)


# ---------------------------------------------------------------------------------------------
# In the storage servers


def store_under(w: ChainWriter, key: bytes, record: bytes) -> None:
    for client, piece in zip(w.clients, w.coder.encode(record), strict=True):
        client.set(key, piece)


def test_fetch_and_walk_refuse_a_v3_record_under_its_blake2b_key(
        redis6: list[RedisProcess]) -> None:
    w = ChainWriter(redis6)
    w.write(50, 25)
    record = w.chain[1].sealed.record
    wrong = b2(record)
    store_under(w, wrong, record)

    async def fetch(key: bytes) -> bytes:
        pool = pool_of(redis6)
        try:
            return (await fetch_record(pool, key)).record
        finally:
            await pool.close()

    with pytest.raises(DecodeError, match="hashes to its key"):
        run(fetch(wrong))
    assert run(fetch(w.chain[1].hash)) == record
    # A chain that names the record by its BLAKE2b (sealed by a writer with the key: the
    # storage alone cannot forge one) breaks there.
    w.append(make_blocks(50, 25), prev=wrong)
    with pytest.raises(DecodeError, match="hashes to its key") as err:
        run(read_all(redis6))
    assert err.value.key == wrong


def mixed_chain(redis6: list[RedisProcess]) -> tuple[ChainWriter, list[Any]]:
    """75 blocks in v2 records, then 75 in v3 records, one chain."""
    w = ChainWriter(redis6, writer=V2Writer(KEY, VDISK, V2_VERSION))
    blocks = w.write(75, 25)
    w.writer = V2Writer(KEY, VDISK)
    blocks += w.write(75, 25, first=75)
    assert [s.sealed.record[4] for s in w.chain] == [2] * 3 + [3] * 3
    return w, blocks


def test_storage_server_walks_headers_of_v2_and_v3_records(redis6: list[RedisProcess]) -> None:
    """The walk script (server 0 follows prev by itself) goes on across the change of
    version; were it to stop at the first v3 record, walks would fall back to one round
    trip per record."""
    w, _ = mixed_chain(redis6)
    pool = pool_of(redis6)

    async def walk() -> list[bytes] | None:
        reader = PieceReader(pool, ErasureCoder(4, 2))
        try:
            return await reader.header_run(w.chain[-1].hash, 100)
        finally:
            await reader.close()
            await pool.close()

    headers = run(walk())
    assert headers is not None and len(headers) == 6
    assert [prefix[12] for prefix in headers] == [3, 3, 3, 2, 2, 2]  # 8-byte length, TLG2


def test_repair_rebuilds_pieces_of_v2_and_v3_records(redis6: list[RedisProcess]) -> None:
    w, blocks = mixed_chain(redis6)
    lost = [(0, w.chain[1]), (5, w.chain[4])]  # a v2 record's piece 0, a v3 record's parity
    for server, stored in lost:
        redis6[server].client().delete(stored.hash)
    pool = pool_of(redis6)

    async def repair() -> Any:
        try:
            return await repair_vdisk(pool, VDISK, RecordOpener(Keyring.of(KEY), None, "v3"))
        finally:
            await pool.close()

    report = run(repair())
    assert report.pieces == 2 and report.complete
    for server, stored in lost:
        assert redis6[server].client().get(stored.hash) == stored.pieces[server]
    items, _ = run(read_all(redis6))
    assert [b for item in items for b in item.blocks] == blocks


# ---------------------------------------------------------------------------------------------
# A v2 log, continued by an upgraded server


def stored_record(redis6: Sequence[RedisProcess], key: bytes) -> bytes:
    """The record under ``key``, joined from its data pieces (no check)."""
    pieces: list[bytes | None] = [r.client().get(key) for r in redis6]
    return ErasureCoder(4, 2).decode(pieces[:4] + [None, None])


def inspect_rows(redis6: list[RedisProcess], vdisk: str) -> list[dict[str, Any]]:
    proc = tlog_cli("inspect", *read_args(redis6, vdisk), "--json")
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_a_v2_log_goes_on_in_v3_after_an_upgrade(redis6: list[RedisProcess],
                                                 redis_factory: RedisFactory,
                                                 tmp_path: Path) -> None:
    """A server kept on v2 (a rollback stays possible) writes v2 records and v2 checkpoints;
    the same vdisk served by the default server goes on in v3. Slave sync carries on across
    the upgrade, and the mixed log restores, verifies, inspects and compacts."""
    vdisk, prefix = "vd-up", "vd-up:"
    (standby,) = redis_factory(1)
    retention = {"keep_sequences": 200, "interval": "1s"}
    old = start_server(redis6, config_file(tmp_path, vdisk, standby, retention=retention),
                       "--storage-format", "v2")
    blocks = workload(0, 600, seed=41, indexes=500)
    try:
        client = Client(old.port, vdisk, 0)  # connected: the vdisk is served, and compacted
        try:
            send_shuffled(client, blocks, random.Random(41))
            client.force_flush(599)
            client.wait_flushed(range(600))
            old.wait_for_log(rf"compacted vdisk {vdisk}", WAIT)
        finally:
            client.close()
    finally:
        old.kill()
    rows = inspect_rows(redis6, vdisk)
    assert rows and {r["format"] for r in rows} == {"v2"}
    assert rows[0]["checkpoint"] is not None  # the server's checkpoint, v2 as well
    assert all(b2(stored_record(redis6, bytes.fromhex(r["hash"]))).hex() == r["hash"]
               for r in rows)

    new = start_server(redis6, config_file(tmp_path, vdisk, standby))
    try:
        blocks += send_workload(new.port, vdisk, first=600, count=600, seed=42, indexes=500)
        with ThreadedClient([new.address], vdisk, None) as client:
            client.wait_nbd_slave_sync(timeout=WAIT)
    finally:
        new.kill()
    rows = inspect_rows(redis6, vdisk)
    formats = [r["format"] for r in rows]
    v3_from = formats.index("v3")
    assert set(formats[:v3_from]) == {"v2"} and set(formats[v3_from:]) == {"v3"}
    assert rows[v3_from]["first_sequence"] == 600
    assert rows[v3_from]["prev"] == rows[v3_from - 1]["hash"]  # the chain goes on
    for r in rows:
        record = stored_record(redis6, bytes.fromhex(r["hash"]))
        assert (b3 if r["format"] == "v3" else b2)(record).hex() == r["hash"]

    expected = image(blocks)
    out = tmp_path / "mixed.img"
    tlog_cli("restore", *read_args(redis6, vdisk), "--output", str(out))
    assert out.read_bytes() == expected
    assert standby_image(standby, prefix) == expected.ljust(SIZE, b"\0")
    assert "chain sound" in tlog_cli("verify", *read_args(redis6, vdisk)).stdout

    # Compacting past the upgrade: one v3 checkpoint stands for v2 and v3 records.
    done = tlog_cli("compact", *read_args(redis6, vdisk), "--no-progress",
                    "--keep-sequences", "300").stdout
    assert "aggregations deleted" in done, done
    rows = inspect_rows(redis6, vdisk)
    assert rows[0]["checkpoint"] is not None and rows[0]["format"] == "v3"
    assert {r["format"] for r in rows} == {"v3"}
    tlog_cli("restore", *read_args(redis6, vdisk), "--output", str(out))
    assert out.read_bytes() == expected
    assert "chain sound" in tlog_cli("verify", *read_args(redis6, vdisk)).stdout


def test_tlog_compact_writes_v2_checkpoints_with_format_v2(redis6: list[RedisProcess],
                                                          tmp_path: Path) -> None:
    """--format v2 (a config's storage_format: v2) keeps what tlog writes readable by a
    tlog that predates v3; the default is v3."""
    w = ChainWriter(redis6, writer=V2Writer(KEY, VDISK, V2_VERSION))
    blocks = w.write(200, 25)
    args = ["--vdisk", VDISK, "--storage-addresses", ",".join(r.address for r in redis6),
            "--priv-key", KEY.decode()]
    tlog_cli("compact", *args, "--no-progress", "--keep-sequences", "100", "--format", "v2")
    rows = [json.loads(line) for line in
            tlog_cli("inspect", *args, "--json").stdout.splitlines()]
    assert rows[0]["checkpoint"] is not None and {r["format"] for r in rows} == {"v2"}
    out = tmp_path / "v2.img"
    tlog_cli("restore", *args, "--output", str(out))
    assert out.read_bytes() == image(blocks)
