"""`tlog restore`, `tlog inspect` and `tlog verify` as real subprocesses, on storage written
by a real tlogserver process (a random workload across a server crash) or laid out directly.

`start_tlogserver` and `send_workload` are shared with the legacy tests.
"""

from __future__ import annotations

import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import yaml

from tlog.protocol import BlockResponse, ClientConnection, HandshakeResponse, block_hash
from tlog.protocol.status import BlockStatus, HandshakeStatus
from tlog.protocol.wire import Block

from .redis_fixture import RedisFactory, RedisProcess
from .serverproc import ServerProcess, config_free_env, start_server, storage_args
from .test_decoder import TS0, VDISK, ChainWriter, make_blocks

KEY = "12345678901234567890123456789012"
WAIT = 30.0  # bound on every wait on the server
BLOCK_SIZE = 4096


# ---------------------------------------------------------------------------------------------
# A real tlogserver process and a plain-socket client


def start_tlogserver(servers: Sequence[RedisProcess], key: str, *extra: str) -> ServerProcess:
    """`tlogserver` in a subprocess on a free port, storing into ``servers``."""
    return start_server(*storage_args([s.address for s in servers], priv_key=key),
                        "--flush-time", "600", *extra)


class Client:
    """One protocol connection over a blocking socket, through the sans-I/O client core."""

    def __init__(self, port: int, vdisk: str, first_sequence: int,
                 range_ops: bool = False) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.core = ClientConnection()
        self.flushed: set[int] = set()
        self.failed: list[int] = []
        self.handshake: HandshakeResponse | None = None
        self.sock.sendall(ClientConnection.send_handshake(vdisk, first_sequence,
                                                          range_ops=range_ops))
        self.pump(lambda: self.handshake is not None, "handshake response")
        assert self.handshake is not None and self.handshake.status == HandshakeStatus.OK

    def send(self, block: Block) -> None:
        self.sock.sendall(ClientConnection.send_block(block.sequence, block.index,
                                                      block.timestamp, block.data,
                                                      block.operation))

    def force_flush(self, sequence: int) -> None:
        self.sock.sendall(ClientConnection.send_force_flush(sequence))

    def pump(self, done: Callable[[], object], what: str = "the server's answers") -> None:
        """Read responses until ``done()``; fails after WAIT seconds or on a closed socket."""
        deadline = time.monotonic() + WAIT
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            self.sock.settimeout(left)
            data = self.sock.recv(1 << 16)
            if not data:
                raise AssertionError(f"server closed the connection while waiting for {what}")
            for event in self.core.receive_data(data):
                if isinstance(event, HandshakeResponse):
                    self.handshake = event
                elif isinstance(event, BlockResponse):
                    if event.status == BlockStatus.FLUSH_OK:
                        self.flushed.update(event.sequences)
                    elif event.status in (BlockStatus.RECV_FAILED, BlockStatus.FLUSH_FAILED):
                        self.failed.extend(event.sequences)

    def wait_flushed(self, sequences: range) -> None:
        self.pump(lambda: self.flushed.issuperset(sequences),
                  f"FlushOK of {sequences.start}..{sequences.stop - 1}")
        assert not self.failed

    def write(self, blocks: Sequence[Block]) -> None:
        """Send ``blocks`` and a ForceFlush, and wait until all are flushed, none failed."""
        frames = [ClientConnection.send_block(b.sequence, b.index, b.timestamp, b.data,
                                              b.operation) for b in blocks]
        self.sock.sendall(b"".join(frames)
                          + ClientConnection.send_force_flush(blocks[-1].sequence))
        want = {b.sequence for b in blocks}
        self.pump(lambda: want <= self.flushed or self.failed,
                  f"FlushOK of {len(want)} blocks")
        assert not self.failed, f"the server failed blocks: {self.failed[:5]}"

    def close(self) -> None:
        self.sock.close()


def workload(first: int, count: int, *, seed: int, indexes: int,
             deletes: float = 0.15) -> list[Block]:
    """Random writes (and deletes) over ``indexes`` block indexes; timestamps rise with the
    sequence in random steps."""
    rng = random.Random(seed)
    ts = TS0 + first * 10_000
    out = []
    for seq in range(first, first + count):
        ts += rng.randrange(1, 20_000)
        if rng.random() < deletes:
            data, op = b"", 2
        else:
            data, op = rng.randbytes(BLOCK_SIZE), 1
        out.append(Block(seq, rng.randrange(indexes), ts, op, block_hash(data), data))
    return out


def send_shuffled(client: Client, blocks: Sequence[Block], rng: random.Random,
                  window: int = 64, dup_rate: float = 0.05) -> None:
    """Send out of order (shuffled within windows), resending some blocks twice."""
    for start in range(0, len(blocks), window):
        chunk = list(blocks[start:start + window])
        rng.shuffle(chunk)
        for block in chunk:
            client.send(block)
            if rng.random() < dup_rate:
                client.send(block)


def send_workload(port: int, vdisk: str, *, first: int, count: int, seed: int,
                  indexes: int) -> list[Block]:
    """Log ``count`` random blocks from sequence ``first`` and wait until all are stored."""
    blocks = workload(first, count, seed=seed, indexes=indexes)
    client = Client(port, vdisk, first)
    try:
        send_shuffled(client, blocks, random.Random(seed))
        client.force_flush(first + count - 1)
        client.wait_flushed(range(first, first + count))
    finally:
        client.close()
    return blocks


def image(blocks: Sequence[Block], *, end_seq: int | None = None,
          end_ts: int | None = None, block_size: int = BLOCK_SIZE) -> bytes:
    """The disk image after applying ``blocks`` in sequence order, up to the bounds; it ends
    with the highest block index touched (as the player's image does)."""
    content: dict[int, bytes] = {}
    top = -1
    for b in sorted(blocks, key=lambda b: b.sequence):
        if (end_seq is not None and b.sequence > end_seq) or (
                end_ts is not None and b.timestamp > end_ts):
            continue
        top = max(top, b.index)
        if b.operation == 1:
            content[b.index] = bytes(b.data).ljust(block_size, b"\0")
        else:
            content.pop(b.index, None)
    out = bytearray((top + 1) * block_size)
    for index, data in content.items():
        out[index * block_size:(index + 1) * block_size] = data
    return bytes(out)


def tlog_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real `tlog` command line in a subprocess (no TLOG_* from the environment)."""
    env = config_free_env()
    proc = subprocess.run([sys.executable, "-c", "from tlog.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120, env=env)
    if check:
        assert proc.returncode == 0, f"tlog {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
    return proc


def read_args(servers: Sequence[RedisProcess], vdisk: str = VDISK) -> list[str]:
    return ["--vdisk", vdisk, "--storage-addresses", ",".join(s.address for s in servers),
            "--priv-key", KEY]


# ---------------------------------------------------------------------------------------------
# The random workload through a real server, with a crash


def test_random_workload_across_a_server_crash(redis6: list[RedisProcess],
                                               redis_factory: RedisFactory,
                                               tmp_path: Path) -> None:
    vdisk = "random"
    total, indexes = 2400, 3000
    ops = workload(0, total, seed=11, indexes=indexes)
    rng = random.Random(3)

    server = start_tlogserver(redis6, KEY)
    try:
        client = Client(server.port, vdisk, 0)
        send_shuffled(client, ops[:1000], rng)  # several flushes of 25, then a forced one
        client.force_flush(999)
        client.wait_flushed(range(0, 1000))
        send_shuffled(client, ops[1000:1610], rng)  # 1600..1609 stay pending (flush-time 600 s)
        client.wait_flushed(range(1000, 1600))
        client.close()
    finally:
        server.kill()  # crash: 1600..1609 are lost by the server, the client still has them

    server = start_tlogserver(redis6, KEY)
    try:
        # Reconnect as the Go client does, as if the last 30 FlushOKs had been lost too: the
        # server reads back what 1570..1599 wrote, sees the very same blocks again and
        # answers FlushOK without storing them twice (0-Disk stores them again).
        client = Client(server.port, vdisk, 1570)
        send_shuffled(client, ops[1570:], rng)
        client.force_flush(total - 1)
        client.wait_flushed(range(1570, total))
        client.close()
    finally:
        server.terminate()

    args = read_args(redis6, vdisk)
    full = tmp_path / "full.img"
    proc = tlog_cli("restore", *args, "--output", str(full))
    assert full.read_bytes() == image(ops)
    assert f"{total} blocks" in proc.stdout and "sequences 0..2399" in proc.stdout
    assert "duplicate" not in proc.stdout and "epoch" not in proc.stdout

    middle = 1234
    rolled = tmp_path / "seq.img"
    tlog_cli("restore", *args, "--end-sequence", str(middle), "--output", str(rolled))
    assert rolled.read_bytes() == image(ops, end_seq=middle)

    when = ops[1777].timestamp
    timed = tmp_path / "ts.img"
    tlog_cli("restore", *args, "--end-timestamp", str(when), "--output", str(timed))
    assert timed.read_bytes() == image(ops, end_ts=when)
    assert timed.read_bytes() != image(ops, end_ts=when - 1)  # the bound is inclusive

    # the rest replayed onto the rolled-back image gives the full image
    tlog_cli("restore", *args, "--start-sequence", str(middle + 1), "--keep-existing",
             "--output", str(rolled))
    assert rolled.read_bytes() == full.read_bytes()

    # into a Redis block store: one key per block, deleted blocks have no key
    (store,) = redis_factory(1)
    tlog_cli("restore", *args, "--output-redis", f"{store.address}@3", "--redis-key-prefix",
             "blk:")
    expected = image(ops)
    client = store.client(db=3)
    # the blocks' keys (decimal indexes), and the store's tlog state for tlog nbd
    keys = {int(k[4:]) for k in client.keys("blk:*") if k[4:].isdigit()}
    assert client.exists(b"blk:tlog:nbd")
    live = {i for i in range(len(expected) // BLOCK_SIZE)
            if expected[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] != bytes(BLOCK_SIZE)}
    assert live <= keys
    for index in keys:
        assert client.get(b"blk:%d" % index) == expected[index * BLOCK_SIZE:
                                                          (index + 1) * BLOCK_SIZE]

    proc = tlog_cli("verify", *args)
    assert "chain sound" in proc.stdout and "sequences 0..2399" in proc.stdout
    assert "stored before" not in proc.stderr  # the resends were not stored a second time

    proc = tlog_cli("inspect", *args, "--json")
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert rows[0]["prev"] == "00" * 32
    assert all(r["prev"] == p["hash"] for p, r in zip(rows, rows[1:], strict=False))
    assert sum(r["blocks"] for r in rows) == total  # every block stored once
    covered = set()
    for r in rows:
        covered.update(range(r["first_sequence"], r["last_sequence"] + 1))
    assert covered == set(range(total))
    assert all(r["format"] == "v3" and r["data_bytes"] > 0 for r in rows)


# ---------------------------------------------------------------------------------------------
# verify catches damage


def written_chain(servers: Sequence[RedisProcess], aggregations: int = 6) -> ChainWriter:
    w = ChainWriter(servers)
    w.write(aggregations * 25, 25)
    return w


def verify_fails(servers: Sequence[RedisProcess]) -> subprocess.CompletedProcess[str]:
    proc = tlog_cli("verify", *read_args(servers), check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "NOT sound" in proc.stdout
    return proc


def test_verify_sound_chain(redis6: list[RedisProcess]) -> None:
    written_chain(redis6)
    proc = tlog_cli("verify", *read_args(redis6))
    assert "chain sound: 6 aggregations, 150 blocks, sequences 0..149" in proc.stdout


def test_verify_catches_a_removed_aggregation(redis6: list[RedisProcess]) -> None:
    w = written_chain(redis6)
    for client in w.clients:
        client.delete(w.chain[2].hash)
    proc = verify_fails(redis6)
    assert f"first bad aggregation {w.chain[3].hash.hex()}" in proc.stdout
    assert w.chain[2].hash.hex() in proc.stdout and "not stored on any server" in proc.stdout


def test_verify_catches_a_broken_prev_link(redis6: list[RedisProcess]) -> None:
    w = written_chain(redis6, 3)
    # The next aggregation points past the newest one: the chain skips sequences 50..74.
    bad = w.append(make_blocks(75, 25), prev=w.chain[1].hash)
    proc = verify_fails(redis6)
    assert w.chain[2].hash.hex() in proc.stdout and "not on the chain" in proc.stdout
    assert "sequences 50..74 are missing" in proc.stderr and bad.hash.hex() in proc.stderr
    # a prev that names nothing stored at all
    w.append(make_blocks(100, 25), prev=os.urandom(32))
    proc = verify_fails(redis6)
    assert "not stored on any server" in proc.stdout


def test_verify_catches_a_corrupted_block(redis6: list[RedisProcess]) -> None:
    w = written_chain(redis6, 2)
    blocks = make_blocks(50, 25, seed=4)
    good = blocks[7]
    blocks[7] = Block(good.sequence, good.index, good.timestamp, 1, block_hash(b"other"),
                      good.data)
    bad = w.append(blocks)
    w.write(50, 25, first=75)
    proc = verify_fails(redis6)
    assert f"first bad aggregation {bad.hash.hex()}" in proc.stdout
    assert "do not match their BLAKE2b" in proc.stdout and "sequences 57" in proc.stdout
    # restore refuses it too when asked to check block hashes, naming it
    proc = tlog_cli("restore", *read_args(redis6), "--output", os.devnull,
                    "--check-block-hashes", check=False)
    assert proc.returncode == 1 and bad.hash.hex() in proc.stderr
    # By default it trusts the record's AES-GCM tag: the record is what was sealed (a
    # server seals only blocks whose hash it checked), so the bad hash goes unnoticed.
    tlog_cli("restore", *read_args(redis6), "--output", os.devnull)


def test_verify_catches_pieces_damaged_beyond_parity(redis6: list[RedisProcess]) -> None:
    w = written_chain(redis6, 3)
    for client in w.clients[:3]:
        client.setrange(w.chain[1].hash, 40, b"\x00\xff")
    proc = verify_fails(redis6)
    assert w.chain[1].hash.hex() in proc.stdout and "hashes to its key" in proc.stdout


# ---------------------------------------------------------------------------------------------
# Options


def test_inspect_text_lines(redis6: list[RedisProcess]) -> None:
    w = written_chain(redis6, 3)
    proc = tlog_cli("inspect", *read_args(redis6))
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [s.hash.hex() for s in w.chain]
    assert "seq 25..49 blocks 25" in lines[1] and lines[1].endswith("v3")


def test_empty_vdisk_and_usage_errors(redis6: list[RedisProcess], tmp_path: Path) -> None:
    args = read_args(redis6, "nothing-here")
    # A vdisk without a log (a typo, other storage) is an error naming it, in every command.
    for command in (["restore", "-o", str(tmp_path / "x.img")], ["inspect"], ["verify"],
                    ["compact", "--keep-sequences", "5"], ["pin", "--name", "p"], ["repair"],
                    ["rekey"]):
        proc = tlog_cli(*command, *args, check=False)
        assert proc.returncode == 1, (command, proc)
        assert proc.stdout == "" and proc.stderr.strip().splitlines()[-1].endswith(
            "vdisk nothing-here: no log: nothing is stored for it on these storage servers "
            "(check the vdisk id and the storage addresses)"), (command, proc.stderr)
    proc = tlog_cli("compact", *args, check=False)
    assert proc.returncode == 2 and ("say what to keep: --keep-since, --keep-sequences or "
                                     "--keep-bytes") in proc.stderr, proc.stderr
    addresses = ",".join(s.address for s in redis6)
    for bad, message in [
        (["--vdisk", "v", "--storage-addresses", addresses, "-o", "x"], "no key"),
        ([*args, "--format", "legacy", "-o", "x"], "needs --nonce"),
        ([*args, "-o", "x", "--output-redis", "h:1"], "exactly one of --output and --output"),
        (["--vdisk", "v", "--priv-key", KEY, "-o", "x"], "no storage given"),
    ]:
        proc = tlog_cli("restore", *bad, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (bad, proc.stderr)


def test_storage_and_key_from_the_server_config_file(redis6: list[RedisProcess],
                                                    tmp_path: Path) -> None:
    w = written_chain(redis6, 2)
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    config = tmp_path / "tlog.yaml"
    config.write_text(yaml.safe_dump({
        "key_file": str(key_file),
        "flush_size": 25,  # a server option: ignored here
        "storage_clusters": {"main": {"servers": [s.address for s in redis6]}},
        "vdisks": {VDISK: {"storage_cluster": "main"}},
    }))
    out = tmp_path / "disk.img"
    tlog_cli("restore", "--vdisk", VDISK, "--config", str(config), "-o", str(out))
    assert out.read_bytes() == image([b for s in w.chain for b in s.blocks])


def test_progress_bar_when_asked(redis6: list[RedisProcess], tmp_path: Path) -> None:
    written_chain(redis6, 2)
    proc = tlog_cli("restore", *read_args(redis6), "-o", str(tmp_path / "d.img"), "--progress")
    assert "restoring blocks" in proc.stderr
    proc = tlog_cli("restore", *read_args(redis6), "-o", str(tmp_path / "d.img"))
    assert proc.stderr == ""  # not a terminal: no bar


# ---------------------------------------------------------------------------------------------
# Throughput (run with TLOG_BENCH=1)


@pytest.mark.skipif(not os.environ.get("TLOG_BENCH"), reason="benchmark: set TLOG_BENCH=1")
def test_restore_throughput(redis6: list[RedisProcess], tmp_path: Path) -> None:
    blocks_total = int(os.environ.get("TLOG_BENCH_BLOCKS", "20000"))
    w = ChainWriter(redis6)
    rng = random.Random(1)
    for first in range(0, blocks_total, 25):
        blocks = []
        for seq in range(first, min(first + 25, blocks_total)):
            payload = rng.randbytes(BLOCK_SIZE)
            blocks.append(Block(seq, rng.randrange(blocks_total * 4), TS0 + seq, 1,
                                block_hash(payload), payload))
        w.append(blocks)
    data = sum(len(b.data) for s in w.chain for b in s.blocks)
    rates, own = [], []
    for run_no in range(3):
        out = tmp_path / f"bench{run_no}.img"
        os.sync()  # the previous image's writeback must not land in this run
        started = time.perf_counter()
        proc = tlog_cli("restore", *read_args(redis6), "-o", str(out))
        wall = time.perf_counter() - started
        rates.append(data / wall / 1e6)
        own.append(float(proc.stdout.rsplit("(", 1)[1].split()[0]))
        out.unlink()
    print(f"\nrestore of {blocks_total} blocks ({data / 1e6:.1f} MB of block data): "
          f"command wall time {', '.join(f'{r:.0f}' for r in rates)} MB/s (median "
          f"{statistics.median(rates):.0f}, interpreter start included); as reported by the "
          f"restore {', '.join(f'{r:.0f}' for r in own)} MB/s (median "
          f"{statistics.median(own):.0f})")
