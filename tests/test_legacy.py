"""0-Disk's legacy storage, both ways, against the Go server's own dumps.

Each dump of ``storage/`` (what the Go tlogserver left in its 6 redis servers) is loaded
into 6 fresh redis-server processes and restored with `tlog restore --format legacy`; the
image must hold exactly the blocks of the dump's manifest, also with 2 servers stopped
and with a byte flipped in one piece. Our legacy writer must produce the Go server's
pieces byte for byte from the blocks the Go client sent (the wire captures), and our
server's legacy output must be readable, including a chain continued from the Go one.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tlog.protocol import ServerConnection
from tlog.protocol.wire import Block
from tlog.read.player import FileBlockStorage, restore
from tlog.record.aggregation import Keyring, LegacyWriter, RecordOpener
from tlog.record.crypto import LegacyCipher
from tlog.record.erasure import ErasureCoder
from tlog.record.keying import blake2b_key

from .redis_fixture import RedisProcess
from .test_decoder import pool_of
from .vectors import NONCE_HEX, PRIV_KEY, need_vectors

CAPTURES = ("ff30", "n2", "rand50")
VDISK = "myimg"
BLOCK_SIZE = 4096
TIMEOUT = 60.0


def manifest(capture: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (need_vectors() / "storage" / capture / "manifest.json").read_text())
    return data


def load_dump(capture: str, servers: Sequence[RedisProcess],
              only: Sequence[int] | None = None) -> None:
    """Put every key of the Go server's dump back into ``servers`` (or those in ``only``)."""
    base = need_vectors() / "storage" / capture
    for i, server in enumerate(servers):
        if only is not None and i not in only:
            continue
        dump = json.loads((base / f"server{i}.json").read_text())
        assert dump["server_index"] == i
        client = server.client()
        for entry in dump["entries"]:
            key = bytes.fromhex(entry["key_hex"])
            if entry["type"] == "string":
                client.set(key, bytes.fromhex(entry["value_hex"]))
            else:
                client.rpush(key, *[bytes.fromhex(v) for v in entry["values_hex"]])
        client.close()


def expected_blocks(man: dict[str, Any]) -> dict[int, str | None]:
    """Block index -> sha256 of its final content (None: deleted), from the manifest."""
    final: dict[int, str | None] = {}
    for agg in man["aggregations_oldest_first"]:
        for b in agg["blocks"]:
            final[b["index"]] = b["data_sha256"] if b["operation"] == 1 else None
    return final


def check_image(path: Path, man: dict[str, Any]) -> None:
    """The image holds exactly the manifest's blocks, and zeroes everywhere else."""
    data = path.read_bytes()
    final = expected_blocks(man)
    assert len(data) == (max(final) + 1) * BLOCK_SIZE
    zero = hashlib.sha256(bytes(BLOCK_SIZE)).hexdigest()
    for index in range(len(data) // BLOCK_SIZE):
        got = hashlib.sha256(data[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE]).hexdigest()
        assert got == (final.get(index) or zero), f"block {index}"


def tlog_cli(*args: str, check: bool = True, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    """Run the real `tlog` command line in a subprocess."""
    proc = subprocess.run([sys.executable, "-c", "from tlog.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env)
    if check:
        assert proc.returncode == 0, f"tlog {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
    return proc


def storage_args(servers: Sequence[RedisProcess]) -> list[str]:
    return ["--vdisk", VDISK, "--storage-addresses", ",".join(s.address for s in servers),
            "--priv-key", PRIV_KEY.decode()]


def legacy_args(servers: Sequence[RedisProcess]) -> list[str]:
    return [*storage_args(servers), "--format", "legacy", "--nonce", NONCE_HEX]


def legacy_opener() -> RecordOpener:
    return RecordOpener(Keyring.of(PRIV_KEY), LegacyCipher.from_hex_nonce(PRIV_KEY, NONCE_HEX),
                        "legacy")


def restore_in_process(servers: Sequence[RedisProcess], path: Path) -> Any:
    async def go() -> Any:
        pool = pool_of(servers)
        storage = FileBlockStorage(path, BLOCK_SIZE)
        try:
            return await restore(pool, VDISK, legacy_opener(), storage)
        finally:
            await storage.close()
            await pool.close()

    return asyncio.run(go())


# ---------------------------------------------------------------------------------------------
# Reading the Go server's storage


@pytest.mark.parametrize("capture", CAPTURES)
def test_restore_go_dump(capture: str, redis6: list[RedisProcess], tmp_path: Path) -> None:
    man = manifest(capture)
    load_dump(capture, redis6)
    out = tmp_path / "disk.img"
    proc = tlog_cli("restore", *legacy_args(redis6), "--output", str(out))
    check_image(out, man)
    blocks = sum(len(a["blocks"]) for a in man["aggregations_oldest_first"])
    assert f"{blocks} blocks" in proc.stdout
    assert f"from {len(man['aggregations_oldest_first'])} aggregations" in proc.stdout
    # auto-detection reads it too when the nonce is given
    auto = tmp_path / "auto.img"
    tlog_cli("restore", *storage_args(redis6), "--nonce", NONCE_HEX, "-o", str(auto))
    assert auto.read_bytes() == out.read_bytes()


@pytest.mark.parametrize("capture", CAPTURES)
def test_restore_go_dump_with_any_two_servers_stopped(capture: str, redis6: list[RedisProcess],
                                                      tmp_path: Path) -> None:
    man = manifest(capture)
    load_dump(capture, redis6)
    out = tmp_path / "disk.img"
    for pair in itertools.combinations(range(6), 2):
        for i in pair:
            redis6[i].stop()
        result = restore_in_process(redis6, out)
        check_image(out, man)
        assert result.rebuilt == (len(man["aggregations_oldest_first"])
                                  if min(pair) < 4 else 0)
        for i in pair:
            redis6[i].start()  # empty again: no persistence
        load_dump(capture, redis6, only=pair)
    # And once through the command line, a data and a parity server down.
    redis6[1].stop()
    redis6[4].stop()
    proc = tlog_cli("restore", *legacy_args(redis6), "--output", str(out))
    check_image(out, man)
    assert "unreachable" in proc.stdout


@pytest.mark.parametrize("capture", CAPTURES)
def test_restore_go_dump_with_a_flipped_byte(capture: str, redis6: list[RedisProcess],
                                             tmp_path: Path) -> None:
    man = manifest(capture)
    load_dump(capture, redis6)
    out = tmp_path / "disk.img"
    for agg in man["aggregations_oldest_first"]:
        key = bytes.fromhex(agg["key"])
        for server in range(6):
            client = redis6[server].client()
            original = client.get(key)
            assert original is not None
            at = (len(original) * 2) // 3
            client.setrange(key, at, bytes([original[at] ^ 0x20]))
            result = restore_in_process(redis6, out)
            check_image(out, man)
            assert result.rebuilt == (1 if server < 4 else 0)  # parity is read only if needed
            client.set(key, original)
            client.close()
    # through the command line, and verify names the damaged piece but calls the chain sound
    first = bytes.fromhex(man["aggregations_oldest_first"][0]["key"])
    redis6[2].client().setrange(first, 17, b"\x99")
    tlog_cli("restore", *legacy_args(redis6), "--output", str(out))
    check_image(out, man)
    proc = tlog_cli("verify", *legacy_args(redis6))
    assert "chain sound" in proc.stdout
    assert "corrupt on server 2" in proc.stderr and first.hex() in proc.stderr


@pytest.mark.parametrize("capture", CAPTURES)
def test_inspect_and_verify_go_dump(capture: str, redis6: list[RedisProcess]) -> None:
    man = manifest(capture)
    load_dump(capture, redis6)
    proc = tlog_cli("inspect", *legacy_args(redis6), "--json")
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    aggs = man["aggregations_oldest_first"]
    assert [r["hash"] for r in rows] == [a["key"] for a in aggs]
    assert [(r["first_sequence"], r["last_sequence"], r["blocks"], r["timestamp"])
            for r in rows] == [(a["first_seq"], a["last_seq"], a["nblocks"], a["timestamp"])
                               for a in aggs]
    assert all(r["format"] == "legacy" and r["record_bytes"] == a["length_prefix"]
               for r, a in zip(rows, aggs, strict=True))
    proc = tlog_cli("verify", *legacy_args(redis6))
    last = aggs[-1]["last_seq"]
    assert f"chain sound: {len(aggs)} aggregations" in proc.stdout
    assert f"sequences 0..{last}" in proc.stdout
    # without the nonce (v2 only) the records cannot be opened: refused, and said so
    proc = tlog_cli("verify", *storage_args(redis6), check=False)
    assert proc.returncode == 1 and "legacy" in proc.stdout


# ---------------------------------------------------------------------------------------------
# Writing it: byte-identical to the Go server


def client_blocks(capture: str) -> dict[int, Block]:
    """The blocks the Go client sent in the wire capture of the same run, by sequence."""
    c2s = (need_vectors() / "wire" / f"{capture}.c2s.bin").read_bytes()
    conn = ServerConnection(max_message_size=1 << 20)
    return {e.sequence: e for e in conn.receive_data(c2s) if isinstance(e, Block)}


@pytest.mark.parametrize("capture", CAPTURES)
def test_legacy_writer_matches_the_go_server_byte_for_byte(capture: str) -> None:
    man = manifest(capture)
    sent = client_blocks(capture)
    writer = LegacyWriter(PRIV_KEY, bytes.fromhex(NONCE_HEX), VDISK)
    coder = ErasureCoder(4, 2)
    base = need_vectors() / "storage" / capture
    stored = [{entry["key_hex"]: entry.get("value_hex")
               for entry in json.loads((base / f"server{i}.json").read_text())["entries"]}
              for i in range(6)]
    for agg in man["aggregations_oldest_first"]:
        blocks = [sent[b["sequence"]] for b in agg["blocks"]]
        sealed = writer.seal(bytes.fromhex(agg["prev"]), blocks, agg["timestamp"])
        assert sealed.hash.hex() == agg["key"] == blake2b_key(sealed.record).hex()
        pieces = coder.encode(sealed.record)
        for i in range(6):
            assert pieces[i].hex() == stored[i][agg["key"]], f"piece {i} of {agg['key']}"


# ---------------------------------------------------------------------------------------------
# Our server writing legacy storage


def test_our_legacy_server_continues_the_go_chain(redis6: list[RedisProcess],
                                                 tmp_path: Path) -> None:
    """tlogserver --storage-format legacy on the Go server's storage: it continues the chain
    the Go server left, and the whole chain restores (and verifies) as one."""
    from .test_cli_read import send_workload, start_tlogserver

    man = manifest("ff30")
    load_dump("ff30", redis6)
    last = man["aggregations_oldest_first"][-1]["last_seq"]
    server = start_tlogserver(redis6, PRIV_KEY.decode(), "--storage-format", "legacy",
                           "--nonce", NONCE_HEX)
    try:
        ours = send_workload(server.port, VDISK, first=last + 1, count=60, seed=5,
                             indexes=40)
    finally:
        server.terminate()
    out = tmp_path / "disk.img"
    tlog_cli("restore", *legacy_args(redis6), "--output", str(out))
    final = expected_blocks(man)
    image = out.read_bytes()
    for b in ours:
        if b.operation == 1:
            final[b.index] = hashlib.sha256(bytes(b.data)).hexdigest()
        else:
            final[b.index] = None
    zero = hashlib.sha256(bytes(BLOCK_SIZE)).hexdigest()
    assert len(image) == (max(final) + 1) * BLOCK_SIZE
    for index in range(len(image) // BLOCK_SIZE):
        got = hashlib.sha256(image[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE]).hexdigest()
        assert got == (final.get(index) or zero), f"block {index}"
    proc = tlog_cli("verify", *legacy_args(redis6))
    assert f"sequences 0..{last + 60}" in proc.stdout
    proc = tlog_cli("inspect", *legacy_args(redis6), "--json")
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["hash"] for r in rows[:2]] == [a["key"] for a in man["aggregations_oldest_first"]]
    assert rows[2]["prev"] == man["aggregations_oldest_first"][-1]["key"]
    assert all(r["format"] == "legacy" for r in rows)
