"""Range deletes (issue 30) against real processes: a tlogserver on six redis-servers, the
`tlog` command line, slave sync's standby, the client library's fallback to a delete per
block, `tlog nbd` with qemu-io, and mkfs.ext4 through nbdfuse. Every image is compared with
a model of the disk that applies the same operations in sequence order.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import capnp
import pytest

from tlog.client import ThreadedClient
from tlog.protocol import (
    ClientConnection,
    Handshake,
    ServerConnection,
    block_hash,
)
from tlog.protocol.ranges import range_count, range_data
from tlog.protocol.status import BlockStatus, Operation
from tlog.protocol.wire import Block

from .redis_fixture import RedisFactory, RedisProcess
from .serverproc import pick_port
from .test_cli_read import KEY, Client, read_args, start_tlogserver, tlog_cli
from .test_decoder import VDISK
from .test_nbd import NbdServer, nbd_args, qemu_io
from .test_retention import compact, restore_image
from .test_slave_sync import config_file, position
from .test_slave_sync import start_server as start_syncing_server
from .vectors import wire

BS = 512  # the block size of test_retention's helpers
TS0 = 1_760_000_000_000_000_000
WAIT = 60.0
RANGE = int(Operation.DELETE_RANGE)


# ---------------------------------------------------------------------------------------------
# Workloads with ranges, and the model


def ranged_blocks(first: int, count: int, *, seed: int, indexes: int, ranges: float = 0.04,
                  deletes: float = 0.1, block_size: int = BS) -> list[Block]:
    """Random sets, deletes and range deletes over ``indexes`` blocks, 1 ms apart; ranges
    are mostly short, some cover up to half the disk."""
    rng = random.Random(seed * 7_919 + first)
    out = []
    for seq in range(first, first + count):
        r = rng.random()
        index = rng.randrange(indexes)
        if r < ranges:
            n = rng.randrange(1, indexes // 2) if rng.random() < 0.3 else rng.randrange(1, 48)
            data, op = range_data(index, min(n, indexes - index)), RANGE
        elif r < ranges + deletes:
            data, op = b"", 2
        else:
            data, op = rng.randbytes(block_size), 1
        out.append(Block(seq, index, TS0 + seq * 1_000_000, op, block_hash(data), data))
    return out


def model(blocks: Sequence[Block], *, end_seq: int | None = None, end_ts: int | None = None,
          block_size: int = BS, size: int | None = None) -> bytes:
    """The image after ``blocks`` in sequence order up to the bounds: as long as ``size``,
    or as the player leaves it (to the end of the last block set or deleted)."""
    content: dict[int, bytes] = {}
    top = -1
    for b in sorted(blocks, key=lambda b: b.sequence):
        if (end_seq is not None and b.sequence > end_seq) or (
                end_ts is not None and b.timestamp > end_ts):
            continue
        if b.operation == RANGE:  # (zeroes; the image grows only with sets and deletes)
            end = b.index + range_count(b.index, b.data)
            for index in [i for i in content if b.index <= i < end]:
                del content[index]
            continue
        top = max(top, b.index)
        if b.operation == 1:
            content[b.index] = bytes(b.data).ljust(block_size, b"\0")
        else:
            content.pop(b.index, None)
    out = bytearray(size if size is not None else (top + 1) * block_size)
    for index, data in content.items():
        out[index * block_size:(index + 1) * block_size] = data
    return bytes(out)


class RawClient(Client):
    """test_cli_read's blocking protocol client, asking for range operations."""

    def __init__(self, port: int, vdisk: str, first: int, range_ops: bool = True) -> None:
        super().__init__(port, vdisk, first, range_ops=range_ops)


def range_block(seq: int, first: int, count: int) -> Block:
    data = range_data(first, count)
    return Block(seq, first, TS0 + seq * 1_000_000, RANGE, block_hash(data), data)


def set_block(seq: int, index: int, fill: int, block_size: int = BS) -> Block:
    data = bytes([fill]) * block_size
    return Block(seq, index, TS0 + seq * 1_000_000, 1, block_hash(data), data)


# ---------------------------------------------------------------------------------------------
# Restore, rollback and compaction across ranges


def test_restore_rollback_and_compaction_across_ranges(redis6: list[RedisProcess],
                                                       tmp_path: Path) -> None:
    total, indexes = 6_000, 1_500
    blocks = ranged_blocks(0, total, seed=30, indexes=indexes)
    server = start_tlogserver(redis6, KEY, "--flush-size", "25")
    try:
        client = RawClient(server.port, VDISK, 0)
        assert client.handshake is not None and client.handshake.range_ops
        for start in range(0, total, 1_000):
            client.write(blocks[start:start + 1_000])
        client.close()
    finally:
        server.kill()
    ranges = [b.sequence for b in blocks if b.operation == RANGE]
    assert len(ranges) > 100
    rng = random.Random(5)
    picked = sorted(rng.sample([s for s in ranges if s > 4_200], 4)
                    + rng.sample([s for s in ranges if s < 4_000], 2))
    seq_points = [total - 1] + [p + d for p in picked for d in (-1, 0, 1)]
    ts_points = [blocks[p].timestamp for p in picked[:3]] + [
        blocks[picked[-1]].timestamp - 500_000, blocks[picked[-1]].timestamp + 500_000]
    before: dict[tuple[str, int], bytes] = {}
    for seq in seq_points:
        before["seq", seq] = restore_image(redis6, tmp_path / "img", end_seq=seq)
        assert before["seq", seq] == model(blocks, end_seq=seq), seq
    for ts in ts_points:
        before["ts", ts] = restore_image(redis6, tmp_path / "img", end_ts=ts)
        assert before["ts", ts] == model(blocks, end_ts=ts), ts
    done = tlog_cli("restore", *read_args(redis6), "--block-size", str(BS), "--output",
                    str(tmp_path / "cli.img"))
    assert f"{len(ranges)} range deletes" in done.stdout, done.stdout
    assert (tmp_path / "cli.img").read_bytes() == before["seq", total - 1]
    tlog_cli("verify", *read_args(redis6))

    # Compacted to the last 1,500 sequences: the checkpoint holds ranges, and every point
    # kept restores as before.
    done = compact(redis6, "--keep-sequences", "1500")
    found = re.search(r"checkpoint of (\d+) live blocks \((\d+) deleted, (\d+) deleted "
                      r"ranges\) at sequence (\d+)", done.stdout)
    assert found, done.stdout
    cut = int(found.group(4))
    assert int(found.group(3)) >= 1
    for (kind, value), expected in before.items():
        if (value if kind == "seq" else blocks.index(next(
                b for b in blocks if b.timestamp >= value))) < cut:
            continue
        bounds = {"end_seq": value} if kind == "seq" else {"end_ts": value}
        assert restore_image(redis6, tmp_path / "img", **bounds) == expected, (kind, value)
    assert restore_image(redis6, tmp_path / "img", end_seq=cut) == model(blocks, end_seq=cut)
    tlog_cli("verify", *read_args(redis6))


def test_a_checkpoint_after_a_whole_device_trim_is_small(redis6: list[RedisProcess],
                                                         tmp_path: Path) -> None:
    indexes = 4_000
    blocks = [set_block(i, i, i % 251 + 1) for i in range(indexes)]
    blocks.append(range_block(indexes, 0, indexes))
    # then writes to 10 blocks, enough of them for the cut to fall after the trim (the
    # newest aggregations, which the servers' last-hash lists name, are never compacted)
    blocks += [set_block(indexes + 1 + i, 7 * (i % 10), i % 200 + 1) for i in range(400)]
    server = start_tlogserver(redis6, KEY, "--flush-size", "25")
    try:
        client = RawClient(server.port, VDISK, 0)
        client.write(blocks)
        client.close()
    finally:
        server.kill()
    done = compact(redis6, "--keep-sequences", "3")
    found = re.search(r"checkpoint of (\d+) live blocks \((\d+) deleted, (\d+) deleted "
                      r"ranges\)", done.stdout)
    assert found, done.stdout
    live, deleted, ranges = map(int, found.groups())
    # the trim is one range; of the 4,000 writes before it nothing is left but a delete of
    # the last one, which keeps the image as long as they made it
    assert (deleted, ranges) == (1, 1) and live <= 10, done.stdout
    assert restore_image(redis6, tmp_path / "img") == model(blocks)


# ---------------------------------------------------------------------------------------------
# Bad ranges, unknown operations, a server that cannot store ranges


def recv_failed_operation(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith("tlog_recv_failed_blocks") and 'reason="operation"' in line:
            return float(line.split()[-1])
    raise AssertionError("no tlog_recv_failed_blocks{reason=\"operation\"} in /metrics")


def test_the_server_refuses_ranges_that_cannot_be_and_loses_nothing(
        redis6: list[RedisProcess], tmp_path: Path) -> None:
    metrics = pick_port()
    server = start_tlogserver(redis6, KEY, "--flush-size", "25", "--metrics-address",
                              f"127.0.0.1:{metrics}")
    try:
        client = RawClient(server.port, VDISK, 0)
        other = RawClient(server.port, "other", 0)
        good = [set_block(0, 5, 1), set_block(1, 6, 2)]
        client.write(good)

        def raw(op: int, index: int, data: bytes) -> Block:
            return Block(2, index, TS0, op, block_hash(data), data)
        bad = [raw(RANGE, 3, struct.pack("<Q", 0)),  # a count of 0
               raw(RANGE, 2**63 - 2, struct.pack("<Q", 5)),  # past the last index
               raw(RANGE, 3, b"1234567"),  # not a count
               raw(RANGE, -4, struct.pack("<Q", 5)),  # a negative index
               raw(4, 3, b""), raw(0, 3, b"")]  # unknown operations
        for n, b in enumerate(bad, 1):
            client.send(b)
            client.pump(lambda n=n: len(client.failed) >= n)  # type: ignore[misc]
        assert client.failed == [2] * len(bad)
        assert recv_failed_operation(metrics) == len(bad)
        client.failed.clear()
        # The connection goes on: sequence 2 sent again, as a range that can be.
        later = [range_block(2, 0, 6), set_block(3, 5, 3)]
        client.write(later)
        other.write([set_block(0, 1, 9)])  # the other vdisk never noticed
        client.close()
        other.close()
    finally:
        server.kill()
    assert restore_image(redis6, tmp_path / "img") == model(good + later)


def test_a_legacy_format_server_gets_a_delete_per_block(redis6: list[RedisProcess],
                                                       tmp_path: Path) -> None:
    from .test_legacy import NONCE_HEX, legacy_args
    from .test_legacy import VDISK as LEGACY_VDISK
    server = start_tlogserver(redis6, KEY, "--storage-format", "legacy", "--nonce", NONCE_HEX)
    try:
        raw = RawClient(server.port, LEGACY_VDISK, 0)
        assert raw.handshake is not None and not raw.handshake.range_ops
        raw.send(range_block(0, 0, 4))
        raw.pump(lambda: raw.failed)
        server.wait_for_log(r"cannot be stored in the legacy \(0-Disk\) record format")
        raw.close()
        with ThreadedClient([server.address], LEGACY_VDISK, 0, range_ops=True) as client:
            assert not client.range_ops
            data = [bytes([i + 1]) * 4096 for i in range(40)]
            client.send_many(Operation.SET, 0, data, None)
            last = client.delete_range(10, 20, timeout=WAIT)
            assert last == 40 + 20 - 1  # one sequence per block deleted
            client.wait_flushed(timeout=WAIT)
    finally:
        server.terminate()
    out = tmp_path / "legacy.img"
    tlog_cli("restore", *legacy_args(redis6), "--output", str(out))
    expected = b"".join(data[:10]) + bytes(20 * 4096) + b"".join(data[30:])
    assert out.read_bytes() == expected


def test_our_client_falls_back_where_the_server_does_not_say_it_takes_ranges(
        redis6: list[RedisProcess], tmp_path: Path) -> None:
    """A server that does not answer rangeOps (the Go server never does; ours does only to
    a client that asks) gets deletes per block from `delete_range`."""
    server = start_tlogserver(redis6, KEY)
    try:
        with ThreadedClient([server.address], VDISK, 0) as plain:  # does not ask
            assert not plain.range_ops
            plain.send_many(Operation.SET, 0, [b"\x01" * 4096] * 8, None)
            assert plain.delete_range(2, 3, timeout=WAIT) == 8 + 3 - 1
            plain.wait_flushed(timeout=WAIT)
        with ThreadedClient([server.address], VDISK, None, range_ops=True) as ranged:
            assert ranged.range_ops
            assert ranged.delete_range(0, 1 << 40, timeout=WAIT) == 11  # one entry
            ranged.send_many(Operation.SET, 6, [b"\x02" * 4096], None)
            ranged.wait_flushed(timeout=WAIT)
            with pytest.raises(ValueError, match="at least one"):
                ranged.delete_range(5, 0)
    finally:
        server.terminate()
    done = tlog_cli("restore", *read_args(redis6), "--output", str(tmp_path / "x.img"),
                    "--size", "28K")
    assert "(9 set, 3 deleted, 1 range deletes)" in done.stdout, done.stdout
    # the 8 blocks written make the image 8 blocks long; the range does not make it longer
    image = (tmp_path / "x.img").read_bytes()
    assert image == bytes(6 * 4096) + b"\x02" * 4096 + bytes(4096)


class GoHandshakeServer:
    """A server that answers the handshake with the Go server's own bytes (captured from
    0-Disk's tlogserver: ../shared/vectors) and every block with RecvOK and FlushOK (our
    encoders give the Go bytes for those: tests/test_protocol.py); it records the blocks'
    operations and what a reference peer reads of the handshake request."""

    def __init__(self) -> None:
        _, s2c, manifest = wire("n2")
        first = manifest["s2c_frames"][1]["offset"]
        self.handshake_answer = s2c[:first]
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.operations: list[int] = []
        self.request: dict[str, object] = {}
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        reference = capnp.load(str(Path(__file__).with_name("reference_layout.capnp")))
        conn, _ = self.listener.accept()
        core = ServerConnection()
        with conn:
            while True:
                data = conn.recv(1 << 16)
                if not data:
                    return
                out = []
                for event in core.receive_data(data):
                    if isinstance(event, Handshake):
                        raw = ClientConnection.send_handshake(
                            event.vdisk_id, event.first_sequence, range_ops=event.range_ops)
                        with reference.HandshakeRequest.from_bytes(raw) as msg:
                            self.request = {"vdisk": msg.vdiskID,
                                            "first": msg.firstSequence}
                        out.append(self.handshake_answer)
                    elif isinstance(event, Block):
                        self.operations.append(event.operation)
                        out.append(ServerConnection.send_response(BlockStatus.RECV_OK,
                                                                  [event.sequence]))
                        out.append(ServerConnection.send_response(BlockStatus.FLUSH_OK,
                                                                  [event.sequence]))
                    else:
                        out.append(ServerConnection.send_response(
                            BlockStatus.FORCE_FLUSH_RECEIVED, []))
                conn.sendall(b"".join(out))


def test_with_the_go_servers_handshake_answer_our_client_deletes_per_block() -> None:
    """The Go server cannot be run here (no Go toolchain): its captured handshake answer
    stands in for it. Our client asks for ranges (a bit the reference schema does not
    have), the answer says nothing of them, and `delete_range` sends deletes per block."""
    go = GoHandshakeServer()
    with ThreadedClient([go.address], "myimg", 0, range_ops=True) as client:
        assert not client.range_ops
        client.send_many(Operation.SET, 0, [b"\x01" * 4096] * 3, None)
        assert client.delete_range(0, 5, timeout=WAIT) == 3 + 5 - 1
        client.wait_flushed(timeout=WAIT)
    assert go.operations == [1, 1, 1, 2, 2, 2, 2, 2]
    assert go.request == {"vdisk": "myimg", "first": 0}


# ---------------------------------------------------------------------------------------------
# Slave sync's standby and a Redis block store


def redis_image(server: RedisProcess, prefix: str, blocks: int, block_size: int) -> bytes:
    r = server.client()
    values = r.mget([f"{prefix}{i}".encode() for i in range(blocks)])
    stray = [k for k in r.scan_iter(match=f"{prefix}*".encode())
             if k[len(prefix):].isdigit() and int(k[len(prefix):]) >= blocks]
    assert not stray, f"blocks outside the vdisk: {stray[:5]}"
    return b"".join(bytes(block_size) if v is None else v for v in values)


def test_the_standby_and_a_redis_restore_follow_ranges(redis6: list[RedisProcess],
                                                       redis_factory: RedisFactory,
                                                       tmp_path: Path) -> None:
    vdisk, prefix, bs, indexes = "vd-range", "vd-range:", 4096, 3_000
    standby, target = redis_factory(2)
    rng = random.Random(30)
    ops: list[Block] = []

    def write(client: ThreadedClient, count: int) -> None:
        for _ in range(count):
            r = rng.random()
            if r < 0.05:
                first = rng.randrange(indexes)
                n = rng.randrange(1, 200)
                seq = client.delete_range(first, n, timeout=WAIT)
                ops.append(range_block(seq, first, n))
            else:
                index = rng.randrange(indexes)
                data = struct.pack("<QQ", index, rng.getrandbits(64)) * (bs // 16)
                seq = client.send_next(Operation.SET, index, None, data)
                ops.append(Block(seq, index, 0, 1, b"", data))

    server = start_syncing_server(redis6, config_file(tmp_path, vdisk, standby))
    try:
        with ThreadedClient([server.address], vdisk, 0, range_ops=True) as client:
            assert client.range_ops
            write(client, 2_000)
            # Larger than a range deleted by naming its keys (blockstore.RANGE_KEYS_MAX):
            # the standby deletes what it holds of it.
            seq = client.delete_range(100, 100_000, timeout=WAIT)
            ops.append(range_block(seq, 100, 100_000))
            write(client, 500)
            client.wait_flushed(timeout=WAIT)
            client.wait_nbd_slave_sync(timeout=WAIT)
    finally:
        server.terminate()
    assert position(standby, prefix)["ended"] == "WaitNbdSlaveSync"
    expected = model(ops, block_size=bs, size=indexes * bs)
    assert redis_image(standby, prefix, indexes, bs) == expected
    tlog_cli("restore", *read_args(redis6, vdisk), "--output-redis", target.address,
             "--redis-key-prefix", prefix)
    assert redis_image(target, prefix, indexes, bs) == expected


# ---------------------------------------------------------------------------------------------
# tlog nbd


def used_memory(servers: Sequence[RedisProcess]) -> int:
    total = 0
    for server in servers:
        with server.client() as client:
            total += int(client.info("memory")["used_memory"])
    return total


def data_extents(path: Path) -> list[tuple[int, int]]:
    """The (start, end) of the file's data (not holes)."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, at = os.fstat(fd).st_size, 0
        while at < size:
            try:
                start = os.lseek(fd, at, os.SEEK_DATA)
            except OSError:
                break  # ENXIO: only a hole is left
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            at = end
    finally:
        os.close(fd)
    return out


def same_data(a: Path, b: Path) -> None:
    """Two large sparse images are equal: the same size, and the same bytes wherever either
    holds data (holes read as zeroes)."""
    assert a.stat().st_size == b.stat().st_size
    with a.open("rb") as fa, b.open("rb") as fb:
        for start, end in data_extents(a) + data_extents(b):
            for at in range(start, end, 1 << 22):
                n = min(1 << 22, end - at)
                fa.seek(at)
                fb.seek(at)
                assert fa.read(n) == fb.read(n), f"bytes {at}..{at + n} differ"


nbd_tools = pytest.mark.skipif(not all(shutil.which(t) for t in ("nbdkit", "qemu-io")),
                               reason="nbdkit or qemu-io missing (make test installs them)")


@nbd_tools
def test_a_whole_device_trim_through_tlog_nbd_is_a_few_entries(redis6: list[RedisProcess],
                                                               tmp_path: Path) -> None:
    size = 4 << 30
    image = tmp_path / "served.img"
    with start_tlogserver(redis6, KEY) as server:
        with NbdServer(tmp_path, *nbd_args(server, "trim4g", image, "--size", "4G")) as nbd:
            qemu_io(nbd.uri, "write -P 0x11 0 1M", "write -P 0x12 3G 64K", "flush")
            before = used_memory(redis6)
            qemu_io(nbd.uri, *[f"discard {g}G 1G" for g in range(4)], "flush")
            grown = used_memory(redis6) - before
            qemu_io(nbd.uri, "write -P 0x13 4096 8K", "write -P 0x14 2G 4K", "flush")
            assert nbd.stop() == 0
    assert grown <= 1 << 20, f"the log grew by {grown} bytes for a trim"
    out = tmp_path / "restored.img"
    done = tlog_cli("restore", *read_args(redis6, "trim4g"), "--size", "4G", "--output",
                    str(out))
    # 256 + 16 blocks written, the trim (qemu-io's requests: at most a few), 3 blocks written
    found = re.search(r"\((\d+) set, (\d+) deleted, (\d+) range deletes\)", done.stdout)
    assert found, done.stdout
    assert int(found.group(1)) == 256 + 16 + 3 and int(found.group(2)) == 0
    assert 1 <= int(found.group(3)) <= 8
    assert sum(end - start for start, end in data_extents(out)) <= 1 << 20
    with out.open("rb") as f:
        f.seek(0)
        assert f.read(16384) == bytes(4096) + b"\x13" * 8192 + bytes(4096)
        f.seek(2 << 30)
        assert f.read(8192) == b"\x14" * 4096 + bytes(4096)
        f.seek(3 << 30)
        assert f.read(4096) == bytes(4096)
    assert out.stat().st_size == size
    same_data(image, out)


@nbd_tools
def test_a_crash_after_a_whole_device_trim_recovers_without_reading_the_holes(
        redis6: list[RedisProcess], tmp_path: Path) -> None:
    """The trim logged by the client, the image punched, no FLUSH confirmed (the tlogserver
    paused), SIGKILL: the restart logs the holes again as ranges, reading none of them."""
    from .test_nbd_crash import kill, paused
    image, sock = tmp_path / "served.img", str(tmp_path / "crash.sock")
    with start_tlogserver(redis6, KEY) as server:
        args = nbd_args(server, "crashtrim", image, "--size", "4G")
        with NbdServer(tmp_path, *args, socket_path=sock) as nbd:
            # (data in the last GiB: gone only once the last request is done)
            qemu_io(nbd.uri, "write -P 0x11 0 1M", "write -P 0x12 3G 1M", "flush")
            with paused(server, True):
                argv = ["qemu-io", "-f", "raw"]
                for g in range(4):  # (qemu-io's requests are below 2 GiB)
                    argv += ["-c", f"discard {g}G 1G"]
                trim = subprocess.Popen([*argv, nbd.uri], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
                deadline = time.monotonic() + WAIT
                while data_extents(image):  # nothing to wait on: the holes show in the file
                    assert trim.poll() is None and time.monotonic() < deadline, "not trimmed"
                    time.sleep(0.01)
                kill(nbd)
                trim.kill()
                trim.wait(timeout=WAIT)
        with NbdServer(tmp_path, *args, socket_path=sock) as nbd:
            line = nbd.wait_for("recovered after an unclean stop")
            assert ("looked at 1048576 block(s) in 1 range(s) (0 read back), logged 0 again "
                    "and 1048576 as deletes") in line, line
            qemu_io(nbd.uri, "write -P 0x13 1G 4K", "flush")
            assert nbd.stop() == 0
    out = tmp_path / "restored.img"
    tlog_cli("restore", *read_args(redis6, "crashtrim"), "--size", "4G", "--output", str(out),
             "--state-file", str(out) + ".state")
    same_data(image, out)
    assert data_extents(out) == [(1 << 30, (1 << 30) + 4096)]


@nbd_tools
def test_a_large_trim_of_a_redis_backend_deletes_what_it_holds(
        redis6: list[RedisProcess], redis_factory: RedisFactory, tmp_path: Path) -> None:
    """1 GiB is 262,144 blocks, more than a range whose keys are named: the backend deletes
    the keys it holds (SCAN), and none of the state's keys."""
    (store,) = redis_factory(1)
    with start_tlogserver(redis6, KEY) as server:
        with NbdServer(tmp_path, "--vdisk", "rt", "--server", server.address, "--backend",
                       "redis", "--redis", store.address, "--size", "1G") as nbd:
            qemu_io(nbd.uri, "write -P 0x31 0 64K", "write -P 0x32 512M 64K",
                    "write -P 0x33 1020M 8K", "flush")
            qemu_io(nbd.uri, "discard 4K 1019M", "write -P 0x34 600M 4K", "flush")
            assert nbd.stop() == 0
    blocks = {k for k in store.client().scan_iter(match=b"rt:*")
              if k[3:].isdigit()}
    assert blocks == {b"rt:0", b"rt:153600", b"rt:261120", b"rt:261121"}
    assert store.client().exists(b"rt:tlog:nbd")  # the export's state is kept
    restored = tmp_path / "restored.img"
    tlog_cli("restore", *read_args(redis6, "rt"), "--size", "1G", "--output", str(restored))
    with restored.open("rb") as f:
        assert f.read(8192) == b"\x31" * 4096 + bytes(4096)
        f.seek(600 << 20)
        assert f.read(4096) == b"\x34" * 4096
        f.seek(1020 << 20)
        assert f.read(8192) == b"\x33" * 8192
    assert sum(end - start for start, end in data_extents(restored)) <= 64 << 10


@nbd_tools
def test_tlog_nbd_trims_per_block_on_a_legacy_format_server(redis6: list[RedisProcess],
                                                           tmp_path: Path) -> None:
    from .test_legacy import NONCE_HEX, legacy_args
    from .test_legacy import VDISK as LEGACY_VDISK
    image = tmp_path / "served.img"
    with start_tlogserver(redis6, KEY, "--storage-format", "legacy", "--nonce",
                          NONCE_HEX) as server:
        with NbdServer(tmp_path, *nbd_args(server, LEGACY_VDISK, image, "--size",
                                           "16M")) as nbd:
            qemu_io(nbd.uri, "write -P 0x21 0 16M", "discard 1M 14M", "write -z 0 4K",
                    "flush")
            assert nbd.stop() == 0
    out = tmp_path / "restored.img"
    done = tlog_cli("restore", *legacy_args(redis6), "--output", str(out), "--size", "16M")
    assert "range deletes" not in done.stdout and "3585 deleted" in done.stdout, done.stdout
    assert out.read_bytes() == image.read_bytes() == (
        bytes(4096) + b"\x21" * ((1 << 20) - 4096) + bytes(14 << 20) + b"\x21" * (1 << 20))


def fuse_ok() -> bool:
    return (all(shutil.which(t) for t in ("nbdkit", "nbdfuse", "mkfs.ext4", "e2fsck", "umount"))
            and os.path.exists("/dev/fuse") and os.geteuid() == 0)


@pytest.mark.skipif(not fuse_ok(), reason="nbdfuse, mkfs.ext4, e2fsck, umount, /dev/fuse or root "
                    "missing (make test installs the tools)")
def test_mkfs_ext4_on_a_64_gib_vdisk_and_the_restore_checks_clean(
        redis6: list[RedisProcess], tmp_path: Path) -> None:
    image, mount = tmp_path / "served.img", tmp_path / "mnt"
    mount.mkdir()
    with start_tlogserver(redis6, KEY) as server:
        with NbdServer(tmp_path, *nbd_args(server, "mkfs", image, "--size", "64G")) as nbd:
            fuse = subprocess.Popen(["nbdfuse", str(mount), "--unix", nbd.socket],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)
            try:
                device = mount / "nbd"
                deadline = time.monotonic() + WAIT
                while not device.exists():
                    assert fuse.poll() is None, f"nbdfuse failed: {fuse.communicate()[1]}"
                    assert time.monotonic() < deadline, "nbdfuse did not show the export"
                    time.sleep(0.05)
                made = subprocess.run(["mkfs.ext4", "-F", "-q", str(device)],
                                      capture_output=True, text=True, timeout=600)
                assert made.returncode == 0, made.stderr
            finally:
                subprocess.run(["umount", str(mount)], capture_output=True, timeout=WAIT)
                fuse.wait(timeout=WAIT)
            assert nbd.stop() == 0
    out = tmp_path / "restored.img"
    done = tlog_cli("restore", *read_args(redis6, "mkfs"), "--size", "64G", "--output",
                    str(out))
    found = re.search(r"(\d+) blocks \(\d+ set, \d+ deleted, (\d+) range deletes\)",
                      done.stdout)
    assert found, done.stdout
    # mkfs discards the device and zeroes its journal: ranges, not 16 million deletes
    assert int(found.group(1)) < 20_000 and int(found.group(2)) >= 1, done.stdout
    checked = subprocess.run(["e2fsck", "-fn", str(out)], capture_output=True, text=True,
                             timeout=600)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    same_data(image, out)
