"""Hostile clients against a live tlogserver, while a well-behaved client keeps flushing.

The server must answer the good client, keep its memory bounded and drop only the
offending connection for: random and mutated streams (a fuzz run), hostile segment tables,
unknown message types, truncated frames, handshakes that never finish, clients that never
read their answers, thousands of connections, and blocks the vdisk cannot take yet (beyond
the out-of-order window, or while storage is behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import socket
import struct
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tlogserver.connection as connection_mod
from tlog.client import TlogClient
from tlog.protocol import Block, ClientConnection, ProtocolError, ServerConnection
from tlog.protocol.status import BlockStatus, HandshakeStatus, Operation

from .redis_fixture import RedisProcess
from .serverproc import ServerProcess, storage_args, stored_sequences
from .wireclient import WireClient, port_of, running_server

T = TypeVar("T")
WAIT = 30.0


def run(coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro
    return asyncio.run(bounded())


def data(seq: int) -> bytes:
    return hashlib.sha256(seq.to_bytes(8, "little")).digest() * 128  # 4 KiB


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def good_writer(address: str, vdisk: str, count: int) -> TlogClient:
    """The well-behaved client: ``count`` blocks, then waits until all are flushed."""
    client = await TlogClient.open([address], vdisk, reconnect_max_delay=0.25)
    for seq in range(count):
        await client.send(Operation.SET, seq, seq % 512, None, data(seq))
        if seq % 64 == 0:
            await asyncio.sleep(0)  # let the hostile connections in between
    await client.wait_flushed(timeout=WAIT)
    return client


# ---------------------------------------------------------------------------------------------
# The sans-I/O core: junk after valid messages


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.binary(max_size=3000), min_size=1, max_size=8),
       st.binary(min_size=1, max_size=3000), st.lists(st.integers(0, 40_000), max_size=20))
def test_junk_after_valid_messages_never_costs_the_valid_ones(
        datas: list[bytes], junk: bytes, cuts: list[int]) -> None:
    """Whatever follows, and however the bytes are cut, every valid block before it comes
    out (in order, hash intact) before the connection is declared broken, and what stays
    buffered is bounded by one message."""
    limit = 70_000
    valid = ClientConnection.send_handshake("vd", 0) + b"".join(
        ClientConnection.send_block(seq, seq, seq, d) for seq, d in enumerate(datas))
    stream = valid + junk
    points = sorted({c % (len(stream) + 1) for c in cuts}) + [len(stream)]
    conn = ServerConnection(max_message_size=limit)
    events: list[Any] = []
    last = 0
    try:
        for point in points:
            events.extend(conn.receive_data(stream[last:point]))
            last = point
            assert conn.buffered <= limit + 9 + 4 * 65
    except ProtocolError:
        assert conn.errored
    blocks = [e for e in events if isinstance(e, Block)]
    assert [(b.sequence, bytes(b.data)) for b in blocks[:len(datas)]] == list(enumerate(datas))
    assert all(b.hash_ok() for b in blocks[:len(datas)])


# ---------------------------------------------------------------------------------------------
# Hostile streams


def _table(count_minus_one: int, sizes: Sequence[int]) -> bytes:
    table = struct.pack("<I", count_minus_one) + b"".join(struct.pack("<I", s) for s in sizes)
    return table + bytes(-len(table) % 8)


def hostile_stream(rng: random.Random, name: str) -> tuple[str, bytes]:
    """One hostile connection's bytes: (kind, bytes)."""
    handshake = ClientConnection.send_handshake(name, 0)
    blocks = b"".join(ClientConnection.send_block(s, s, s, rng.randbytes(rng.randrange(5000)))
                      for s in range(rng.randrange(1, 12)))
    kind = rng.choice(["random", "handshake+random", "flipped", "truncated", "huge-size",
                       "many-segments", "unknown-type", "wrong-hash", "far-ahead",
                       "frame-of-junk", "flipped-handshake"])
    if kind == "random":
        body = rng.randbytes(rng.randrange(1, 70_000))
    elif kind == "handshake+random":
        body = handshake + rng.randbytes(rng.randrange(1, 70_000))
    elif kind in ("flipped", "flipped-handshake"):
        stream = bytearray(handshake + blocks)
        lo = 0 if kind == "flipped-handshake" else len(handshake)
        hi = len(handshake) if kind == "flipped-handshake" else len(stream)
        for _ in range(rng.randrange(1, 10)):
            stream[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
        body = bytes(stream)
    elif kind == "truncated":
        body = handshake + blocks[:rng.randrange(1, len(blocks))]
    elif kind == "huge-size":
        body = handshake + b"\x01" + _table(0, [rng.randrange(1 << 20, 1 << 32)])
    elif kind == "many-segments":
        body = handshake + b"\x01" + _table(rng.randrange(64, 1 << 32), [1] * 70)
    elif kind == "unknown-type":
        body = handshake + bytes((rng.randrange(4, 256),)) + blocks[1:]
    elif kind == "wrong-hash":
        body = handshake + b"".join(
            ClientConnection.send_block(s, s, s, data(s), hash=rng.randbytes(32))
            for s in range(20))
    elif kind == "far-ahead":
        body = handshake + b"".join(ClientConnection.send_block(s, s, s, data(s))
                                    for s in range(10**9, 10**9 + 20))
    else:  # a well-formed frame of random words instead of a handshake
        words = rng.randrange(1, 64)
        body = _table(0, [words]) + rng.randbytes(8 * words)
    return kind, body


async def hostile_connection(port: int, kind: str, body: bytes,
                             rng: random.Random) -> str:
    """Send ``body`` in random pieces; then leave, or read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        at = 0
        while at < len(body):
            step = rng.randrange(1, 9000)
            writer.write(body[at:at + step])
            at += step
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(writer.drain(), WAIT)
        if rng.random() < 0.3:
            return "left"
        try:
            async with asyncio.timeout(1.0):
                while await reader.read(65536):
                    pass
            return "closed by the server"
        except TimeoutError:
            return "still open"  # harmless streams (e.g. far-ahead blocks) are kept
    except ConnectionError:
        return "reset by the server"
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def test_fuzz_run_against_a_live_server_while_a_good_client_flushes(
        redis6: list[RedisProcess]) -> None:
    addresses = [r.address for r in redis6]
    server = ServerProcess(*storage_args(addresses), "--handshake-timeout", "2").start()
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    outcomes: dict[str, dict[str, int]] = {}
    count = 4000

    async def scenario() -> tuple[int, int, int]:
        loop = asyncio.get_running_loop()
        assert server.pid is not None
        warm = await good_writer(server.address, "warmup", 500)  # the server's usual working set
        await warm.close()
        before = rss_kib(server.pid)
        writer = loop.create_task(good_writer(server.address, "good", count))
        peak = before
        sem = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            nonlocal peak
            kind, body = hostile_stream(rng, f"fuzz{i}")
            async with sem:
                outcome = await hostile_connection(server.port, kind, body,
                                                   random.Random(rng.random()))
            per_kind = outcomes.setdefault(kind, {})
            per_kind[outcome] = per_kind.get(outcome, 0) + 1
            assert server.pid is not None
            peak = max(peak, rss_kib(server.pid))

        await asyncio.gather(*(one(i) for i in range(400)))
        client = await asyncio.wait_for(writer, WAIT)
        assert client.stats().flushed_blocks == count
        await client.close()
        return before, peak, rss_kib(server.pid)

    try:
        before, peak, after = run(scenario())
        assert server.running, "the server died"
    finally:
        server.kill()
    print(f"fuzz seed {seed}: RSS {before} -> peak {peak} -> {after} KiB; {outcomes}")
    assert run(stored_sequences(addresses, "good")) == list(range(count))
    # A hostile connection costs its receive buffer while it is open; nothing piles up.
    assert peak - before < 64 * 1024, f"RSS grew by {peak - before} KiB (seed {seed})"
    for kind in ("huge-size", "many-segments", "unknown-type", "frame-of-junk"):
        assert "still open" not in outcomes.get(kind, {}), (kind, outcomes, seed)


@pytest.mark.parametrize("kind,payload", [
    ("huge segment size", b"\x01" + _table(0, [0xFFFFFFFF])),
    ("too many segments", b"\x01" + _table(1_000_000, [1] * 70)),
    ("unknown message type", b"\x09" + _table(0, [2]) + bytes(16)),
    ("garbage after the handshake", b"\xde\xad\xbe\xef" * 1000),
    ("malformed block", b"\x01" + _table(0, [3]) + b"\xff" * 24),
])
def test_a_hostile_frame_after_the_handshake_closes_only_its_connection_at_once(
        redis6: list[RedisProcess], kind: str, payload: bytes) -> None:
    async def scenario() -> float:
        async with running_server([r.address for r in redis6], flush_size=10) as server:
            good = await WireClient.connect(port_of(server), vdisk="good")
            bad = await WireClient.connect(port_of(server), vdisk="bad")
            started = time.monotonic()
            bad.write(payload)  # no body follows a hostile table: closed from the table alone
            await bad.wait_closed()
            elapsed = time.monotonic() - started
            for seq in range(10):
                good.send(seq, data(seq))
            await good.wait_flushed(range(10))
            assert not good.closed and len(server.connections) == 1
            await good.close()
            await bad.close()
            return elapsed

    assert run(scenario()) < 2.0, kind


def test_truncated_frames_and_unfinished_handshakes_are_dropped(
        redis6: list[RedisProcess]) -> None:
    async def scenario() -> None:
        async with running_server([r.address for r in redis6], handshake_timeout=0.5,
                                  flush_size=5) as server:
            port = port_of(server)
            good = await WireClient.connect(port, vdisk="good")
            # a block cut in the middle, then the client goes away: nothing of it is kept
            cut = await WireClient.connect(port, vdisk="cut")
            cut.write(ClientConnection.send_block(0, 0, 0, data(0))[:2000])
            await cut.close()
            # half a handshake, and an idle connection: both closed after the timeout
            half = await WireClient.connect(port, vdisk=None)
            half.write(ClientConnection.send_handshake("slow", 0)[:7])
            idle = await WireClient.connect(port, vdisk=None)
            started = time.monotonic()
            await half.wait_closed()
            await idle.wait_closed()
            elapsed = time.monotonic() - started
            assert 0.4 <= elapsed < 3.0, elapsed
            for seq in range(5):
                good.send(seq, data(seq))
            await good.wait_flushed(range(5))
            assert set(server.vdisks) == {"good"}
            assert len(server.connections) == 1
            await good.close()

    run(scenario())


class ClosedConnections(logging.Handler):
    """The connections tlogserver closes, by name, with the reason it logs."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.closed: dict[str, str] = {}
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("closing: "):
            self.closed[getattr(record, "conn", "?")] = message[len("closing: "):]
            self.event.set()


def test_a_client_that_never_reads_is_disconnected(redis6: list[RedisProcess],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection_mod, "WRITE_BUFFER_HIGH", 64 * 1024)
    logger = logging.getLogger("tlogserver")

    async def scenario() -> None:
        watch = ClosedConnections()  # made in the loop: its event belongs to it
        logger.addHandler(watch)
        level = logger.level
        logger.setLevel(logging.INFO)
        try:
            await never_reads(watch)
        finally:
            logger.removeHandler(watch)
            logger.setLevel(level)

    async def never_reads(watch: ClosedConnections) -> None:
        async with running_server([r.address for r in redis6], flush_size=10,
                                  stalled_writer_timeout=0.5) as server:
            port = port_of(server)
            good = await WireClient.connect(port, vdisk="good")
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(ClientConnection.send_handshake("mute", 0))
            # Requests whose answers it never reads: the answers fill the kernel's buffers,
            # then the server's (bounded) write buffer; the server stops reading it, then
            # gives up on it.
            request = ClientConnection.send_wait_nbd_slave_sync()
            writer.write(request * 400_000)
            await asyncio.wait_for(watch.event.wait(), WAIT)
            assert list(watch.closed.values()) == ["client stopped reading its responses"]
            for seq in range(10):  # the other vdisk was served all along
                good.send(seq, data(seq))
            await good.wait_flushed(range(10))
            assert len(server.connections) == 1  # released, not left to flush forever
            writer.transport.abort()
            await good.close()

    run(scenario())


def test_thousands_of_connections_keep_memory_bounded(tmp_path: Path) -> None:
    n = 2000
    server = ServerProcess("--memory-storage", "--handshake-timeout", "3").start()

    async def scenario() -> tuple[int, int, float]:
        assert server.pid is not None
        warm = await good_writer(server.address, "warmup", 200)
        await warm.close()
        before = rss_kib(server.pid)
        idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        joined: list[WireClient] = []
        for i in range(n):
            if i % 2:
                idle.append(await asyncio.open_connection("127.0.0.1", server.port))
            else:  # half handshake a vdisk of their own, and stay
                joined.append(await WireClient.connect(server.port, vdisk=f"many{i}"))
        assert all(c.handshake.status == HandshakeStatus.OK for c in joined)
        with_all = rss_kib(server.pid)
        client = await good_writer(server.address, "good", 1000)  # served all the same
        await client.close()
        started = time.monotonic()
        for reader, writer in idle:  # the handshake timeout closes the idle half
            data = await asyncio.wait_for(reader.read(), WAIT)
            assert data == ServerConnection.send_handshake_response(
                HandshakeStatus.INVALID_REQUEST) or data == b""
            writer.close()
        waited = time.monotonic() - started
        for c in joined:
            await c.close()
        return before, with_all, waited

    try:
        before, with_all, waited = run(scenario())
        assert server.running
    finally:
        server.kill()
    per_connection = (with_all - before) / n
    print(f"{n} connections: RSS {before} -> {with_all} KiB, {per_connection:.0f} KiB each")
    # Bounded per connection (today mostly its 256 KiB receive buffer; see
    # docs/reliability.md), whatever the connection sends or does not send.
    assert per_connection < 320, f"{per_connection:.0f} KiB per connection"
    assert waited < 5.0


# ---------------------------------------------------------------------------------------------
# Blocks the vdisk cannot take yet


def test_out_of_order_window_in_bytes_refuses_then_takes_the_resend(
        redis6: list[RedisProcess]) -> None:
    async def scenario() -> None:
        async with running_server([r.address for r in redis6], max_buffered_bytes=10_000,
                                  flush_size=5) as server:
            client = await WireClient.connect(port_of(server))
            for seq in (1, 2, 3):  # 4 KiB each, ahead of 0: the third one does not fit
                client.send(seq, data(seq))
            await client.wait_for(lambda: len(client.events) == 4, "three answers")
            assert client.responses(BlockStatus.RECV_FAILED) == [(3,)]
            assert server.vdisks["vd"].ahead_bytes == 2 * 4096
            client.send(0, data(0))
            client.send(3, data(3))  # the resend
            client.send(4, data(4))
            await client.wait_flushed(range(5))
            await client.close()

    run(scenario())


def test_storage_falling_behind_bounds_what_a_vdisk_holds(
        redis6: list[RedisProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    addresses = [r.address for r in redis6]

    async def scenario() -> None:
        async with running_server(addresses, flush_size=25,
                                  max_pending_bytes=100 * 4096) as server:
            client = await WireClient.connect(port_of(server))
            for r in redis6[:3]:
                r.stop()  # nothing can be stored
            for seq in range(400):
                client.send(seq, data(seq))
            await client.wait_for(lambda: len(client.responses(BlockStatus.RECV_OK))
                                  + len(client.responses(BlockStatus.RECV_FAILED)) >= 400,
                                  "400 answers")
            vdisk = server.vdisks["vd"]
            refused = sorted(s for g in client.responses(BlockStatus.RECV_FAILED) for s in g)
            assert refused and refused[0] == 100  # the first block over the bound
            assert vdisk.pending_bytes == 100 * 4096
            assert vdisk.ahead_bytes <= 300 * 4096  # the rest waits in the window
            for r in redis6[:3]:
                r.start()
            await client.wait_flushed(range(100))  # retried by the server
            # the client resends what was refused, as the real client does after a while
            for seq in refused:
                client.send(seq, data(seq))
            await client.wait_flushed(range(400))
            await client.close()

    run(scenario())
    assert run(stored_sequences(addresses, "vd")) == list(range(400))
