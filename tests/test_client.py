"""The tlog client against real tlogservers, a scriptable fake one and recorded bytes.

Real servers run as subprocesses (`serverproc.ServerProcess`) on memory storage or on
six real redis-servers; the fake server (for failures a real one does not produce on
demand) is built on the sans-I/O `ServerConnection` and lives in the test's event loop.
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import pytest

from tlog.client import (
    ClientClosedError,
    InvalidRequestError,
    InvalidVdiskIDError,
    InvalidVersionError,
    SlaveSyncError,
    ThreadedClient,
    TlogClient,
    encode_block,
)
from tlog.protocol import (
    Block,
    BlockResponse,
    ClientConnection,
    ForceFlush,
    Handshake,
    HandshakeResponse,
    ServerConnection,
    WaitNbdSlaveSync,
    wire,
)
from tlog.protocol.status import BlockStatus, HandshakeStatus, Operation

from .serverproc import ServerProcess, pick_port, storage_args, stored_blocks, stored_sequences
from .vectors import VECTORS

T = TypeVar("T")

BS = 4096


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Drive a coroutine to completion with a deadline (pytest-asyncio is not used)."""
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro
    return asyncio.run(bounded())


def block_data(seq: int, size: int = BS) -> bytes:
    return (seq.to_bytes(8, "big") * (size // 8 + 1))[:size]


async def send_range(client: TlogClient, first: int, count: int) -> None:
    for seq in range(first, first + count):
        await client.send(Operation.SET, seq, seq, 0, block_data(seq))


class FlushedPast:
    """An on_response callback with an event set once FlushOK reached a sequence."""

    def __init__(self, sequence: int) -> None:
        self.sequence = sequence
        self.event = asyncio.Event()

    def __call__(self, status: BlockStatus | int, sequences: Any) -> None:
        if status == BlockStatus.FLUSH_OK and sequences and max(sequences) >= self.sequence:
            self.event.set()


# -- encoding and recorded bytes ---------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 512, 4096, 65536])
def test_encode_block_is_byte_identical_to_the_sans_io_encoder(size: int) -> None:
    data = random.Random(size).randbytes(size)
    for op in (Operation.SET, Operation.DELETE):
        ours = encode_block(2**40 + 3, 77, 1_700_000_000_000_000_000, data, op)
        assert ours == ClientConnection.send_block(2**40 + 3, 77, 1_700_000_000_000_000_000,
                                                   data, op)
        parsed = ServerConnection()
        parsed.receive_data(ClientConnection.send_handshake("v", 0))
        (block,) = parsed.receive_data(ours)
        assert isinstance(block, Block) and block.hash_ok()
        assert (block.sequence, block.index, block.operation, bytes(block.data)) == (
            2**40 + 3, 77, op, data)


def _captures() -> list[str]:
    return sorted(p.name[:-len(".s2c.bin")] for p in (VECTORS / "wire").glob("*.s2c.bin")
                  if (VECTORS / "wire" / (p.name[:-len(".s2c.bin")] + ".manifest.json")).exists())


def _expected(manifest: dict[str, Any]) -> list[tuple[str, int, tuple[int, ...]]]:
    if "s2c_frames" not in manifest:  # a single handshake answer
        return [("handshake", manifest["decoded"]["status"], ())]
    out = []
    for frame in manifest["s2c_frames"]:
        decoded = frame["decoded"]
        kind = "handshake" if frame["kind"] == "handshakeResponse" else "response"
        out.append((kind, decoded["status"], tuple(decoded.get("sequences", ()))))
    return out


def _chunks(data: bytes, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    at = 0
    while at < len(data):
        n = rng.choice([1, 3, 8, 23, 40, 41, 100, 1000])
        yield data[at:at + n]
        at += n


@pytest.mark.parametrize("capture", _captures())
@pytest.mark.parametrize("seed", [0, 1, None])
def test_reference_server_bytes_decode_to_the_manifest(capture: str, seed: int | None) -> None:
    wire_dir = VECTORS / "wire"
    data = (wire_dir / f"{capture}.s2c.bin").read_bytes()
    expected = _expected(json.loads((wire_dir / f"{capture}.manifest.json").read_text()))
    pieces = [data] if seed is None else list(_chunks(data, seed))

    # the sans-I/O client side
    conn = ClientConnection()
    got: list[tuple[str, int, tuple[int, ...]]] = []
    for piece in pieces:
        for event in conn.receive_data(piece):
            if isinstance(event, HandshakeResponse):
                assert event.version == 0x01010008
                got.append(("handshake", int(event.status), ()))
            else:
                assert isinstance(event, BlockResponse)
                got.append(("response", int(event.status), event.sequences))
    assert got == expected
    assert conn._reader.pending == 0


def test_reader_accepts_other_valid_layouts() -> None:
    """A null sequence list and a two-segment frame still decode (through pycapnp)."""
    reader = ClientConnection()
    (hs,) = reader.receive_data(ServerConnection.send_handshake_response(HandshakeStatus.OK))
    assert isinstance(hs, HandshakeResponse)
    # root struct (1 data word: status 3, 1 pointer: null)
    null_list = wire.frame(struct.pack("<QQQ", (1 << 32) | (1 << 48), 3, 0))
    # FlushOK [40, 41, 42] whose list lives in a second segment, reached by a far pointer
    seg0 = struct.pack("<QQQ", (1 << 32) | (1 << 48), 2, 2 | (1 << 32))
    seg1 = struct.pack("<QQQQ", 1 | (5 << 32) | (3 << 35), 40, 41, 42)
    multi = struct.pack("<IIII", 1, 3, 4, 0) + seg0 + seg1
    got = reader.receive_data(null_list + multi + wire.encode_response(1, [7]))
    assert [(s, tuple(q)) for s, q in got] == [(3, ()), (2, (40, 41, 42)), (1, (7,))]


# -- a scriptable fake server ---------------------------------------------------------------


class FakeServer:
    """A tlogserver with failures on demand, on the sans-I/O ServerConnection.

    Orders blocks per vdisk like a real server (expected sequence from the first
    handshake, flush every ``flush_size``), answering every connection.
    """

    def __init__(self, *, flush_size: int = 5, handshake_statuses: list[int] | None = None,
                 drop_once: set[int] | None = None, mute_connections: int = 0,
                 flush_failures: int = 0, noisy_flush_ok: bool = False,
                 hold_flush: bool = False) -> None:
        self.flush_size = flush_size
        self.handshake_statuses = list(handshake_statuses or [])
        self.drop_once = set(drop_once or ())
        self.mute_connections = mute_connections
        self.flush_failures = flush_failures
        self.noisy_flush_ok = noisy_flush_ok
        self.hold_flush = hold_flush
        self.handshakes: list[Handshake] = []
        self.received: list[int] = []  # sequences, every arrival
        self.flushed: list[int] = []
        self.connections: list[_FakeConn] = []
        self.expected: int | None = None
        self.ready: list[int] = []
        self.ahead: set[int] = set()
        self.force_at: int | None = None
        self._changed = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None
        self.address = ""

    async def start(self) -> FakeServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _FakeConn(self), "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in self.connections:
                if conn.transport is not None:
                    conn.transport.abort()
            await self._server.wait_closed()

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()

    def broadcast(self, data: bytes) -> None:
        for conn in self.connections:
            if conn.transport is not None and not conn.transport.is_closing():
                conn.transport.write(data)

    def flush(self, count: int | None = None) -> None:
        if not self.ready:
            return
        batch = self.ready[:count] if count else self.ready[:]
        del self.ready[:len(batch)]
        if self.flush_failures > 0:
            # like the reference: report, forget the vdisk, let the client come back
            self.flush_failures -= 1
            self.broadcast(ServerConnection.send_response(BlockStatus.FLUSH_FAILED, batch))
            self.expected, self.ready, self.ahead = None, [], set()
            return
        self.flushed.extend(batch)
        response = ServerConnection.send_response(BlockStatus.FLUSH_OK, batch)
        self.broadcast(response)
        if self.noisy_flush_ok:
            self.broadcast(response + ServerConnection.send_response(
                BlockStatus.FLUSH_OK, [10**12, batch[0]]) + ServerConnection.send_response(
                BlockStatus.RECV_OK, [10**12 + 1]))

    def maybe_flush(self) -> None:
        if self.hold_flush:
            return
        if self.force_at is not None and self.expected is not None and (
                self.force_at < self.expected):
            self.force_at = None
            self.flush()
        while len(self.ready) >= self.flush_size:
            self.flush(self.flush_size)

    def release(self) -> None:
        self.hold_flush = False
        self.flush()
        self.notify()


class _FakeConn(asyncio.Protocol):
    def __init__(self, fake: FakeServer) -> None:
        self.fake = fake
        self.core = ServerConnection()
        self.transport: asyncio.Transport | None = None
        self.muted = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.fake.connections.append(self)
        self.fake.notify()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.fake.connections:
            self.fake.connections.remove(self)
        self.fake.notify()

    def data_received(self, data: bytes) -> None:
        fake = self.fake
        out: list[bytes] = []
        for event in self.core.receive_data(data):
            if self.muted:  # a server that hangs: reads, never answers
                if isinstance(event, Block):
                    fake.received.append(event.sequence)
                continue
            if isinstance(event, Handshake):
                fake.handshakes.append(event)
                status = (fake.handshake_statuses.pop(0) if fake.handshake_statuses
                          else HandshakeStatus.OK)
                out.append(ServerConnection.send_handshake_response(HandshakeStatus(status)))
                if status != HandshakeStatus.OK:
                    assert self.transport is not None
                    self.transport.write(b"".join(out))
                    self.transport.close()
                    fake.notify()
                    return
                if fake.expected is None or event.reset_first_sequence:
                    fake.expected = event.first_sequence
                if fake.mute_connections > 0:
                    fake.mute_connections -= 1
                    self.muted = True
            elif isinstance(event, Block):
                seq = event.sequence
                fake.received.append(seq)
                if seq in fake.drop_once:
                    fake.drop_once.discard(seq)
                    continue
                assert event.hash_ok() and fake.expected is not None
                out.append(ServerConnection.send_response(BlockStatus.RECV_OK, [seq]))
                if seq == fake.expected:
                    fake.ready.append(seq)
                    fake.expected += 1
                    while fake.expected in fake.ahead:
                        fake.ahead.discard(fake.expected)
                        fake.ready.append(fake.expected)
                        fake.expected += 1
                elif seq > fake.expected:
                    fake.ahead.add(seq)
                elif seq in fake.flushed:
                    out.append(ServerConnection.send_response(BlockStatus.FLUSH_OK, [seq]))
            elif isinstance(event, ForceFlush):
                out.append(ServerConnection.send_response(BlockStatus.FORCE_FLUSH_RECEIVED))
                fake.force_at = event.sequence
            elif isinstance(event, WaitNbdSlaveSync):
                out.append(ServerConnection.send_response(
                    BlockStatus.WAIT_NBD_SLAVE_SYNC_RECEIVED))
        if out and self.transport is not None:
            self.transport.write(b"".join(out))
        fake.maybe_flush()
        fake.notify()


def with_fake(scenario: Callable[[FakeServer], Coroutine[Any, Any, T]], timeout: float = 30.0,
              **options: Any) -> T:
    async def main() -> T:
        fake = await FakeServer(**options).start()
        try:
            return await scenario(fake)
        finally:
            await fake.stop()
    return run(main(), timeout)


# -- against our real server --------------------------------------------------------------


def test_ten_thousand_blocks_all_flushed_and_stored_in_order(redis6: list[Any]) -> None:
    addresses = [r.address for r in redis6]
    server = ServerProcess(*storage_args(addresses)).start()
    n = 10_000

    async def scenario() -> Any:
        async with TlogClient([server.address], "ten-k") as client:
            await send_range(client, 0, n)
            await client.wait_flushed(timeout=60)
            return client.stats()

    try:
        stats = run(scenario())
    finally:
        server.kill()
    assert (stats.flushed_blocks, stats.unflushed_blocks, stats.last_flushed) == (n, 0, n - 1)
    assert stats.resends == 0 and stats.reconnects == 0
    blocks = run(stored_blocks(addresses, "ten-k"))
    assert [b.sequence for b in blocks] == list(range(n))
    assert all(bytes(b.data) == block_data(b.sequence) and b.index == b.sequence
               for b in blocks[::97])


def test_handshake_refusals_are_typed_exceptions(mem_server: ServerProcess) -> None:
    async def connect(vdisk: str, **options: Any) -> None:
        client = await TlogClient.open([mem_server.address], vdisk, timeout=10, **options)
        await client.close()

    with pytest.raises(InvalidVdiskIDError) as refused:
        run(connect("not a valid id!"))
    assert refused.value.status == HandshakeStatus.INVALID_VDISK_ID
    assert refused.value.address == mem_server.address
    with pytest.raises(InvalidVersionError):
        run(connect("fine", version=0x01000001))  # 1.0.0 is older than the minimum


def test_invalid_request_is_permanent_internal_error_is_retried() -> None:
    async def refused(fake: FakeServer) -> None:
        await TlogClient.open([fake.address], "v", timeout=5)

    with pytest.raises(InvalidRequestError):
        with_fake(refused, handshake_statuses=[HandshakeStatus.INVALID_REQUEST])

    async def retried(fake: FakeServer) -> tuple[int, int]:
        async with TlogClient([fake.address], "v", reconnect_delay=0.01) as client:
            await send_range(client, 0, 7)
            await client.wait_flushed(timeout=10)
            return len(fake.handshakes), client.flushed_blocks

    assert with_fake(retried, handshake_statuses=[HandshakeStatus.INTERNAL_SERVER_ERROR] * 2) \
        == (3, 7)


def test_no_server_at_all_fails_connect_within_the_timeout() -> None:
    dead = f"127.0.0.1:{pick_port()}"

    async def scenario() -> None:
        await TlogClient.open([dead], "v", timeout=0.5, reconnect_delay=0.05,
                              reconnect_max_delay=0.1)

    started = time.monotonic()
    with pytest.raises(ConnectionError, match="no tlogserver"):
        run(scenario(), timeout=10)
    assert time.monotonic() - started < 5


def test_duplicate_and_unknown_flush_ok_are_ignored() -> None:
    async def scenario(fake: FakeServer) -> Any:
        async with TlogClient([fake.address], "v") as client:
            await send_range(client, 0, 20)
            await client.wait_flushed(timeout=10)
            await client.wait_nbd_slave_sync(timeout=10)  # everything the server sent was read
            return client.stats()

    stats = with_fake(scenario, noisy_flush_ok=True)
    assert stats.flushed_blocks == 20 and stats.unflushed_blocks == 0
    assert stats.unflushed_bytes == 0 and stats.last_flushed == 10**12


def test_silently_dropped_blocks_are_resent_after_the_timeout() -> None:
    """A fake server that swallows blocks 3 and 11 (no RecvOK): the periodic check resends."""
    async def scenario(fake: FakeServer) -> tuple[Any, float, list[int]]:
        async with TlogClient([fake.address], "v", resend_timeout=0.3) as client:
            started = time.monotonic()
            await send_range(client, 0, 20)
            await client.wait_flushed(timeout=10)
            return client.stats(), time.monotonic() - started, list(fake.received)

    stats, elapsed, received = with_fake(scenario, drop_once={3, 11})
    assert stats.flushed_blocks == 20 and stats.reconnects == 0
    assert stats.resends >= 2
    assert received.count(3) == 2 and received.count(11) == 2
    assert elapsed >= 0.3


def test_dropping_proxy_in_front_of_a_real_server_forces_resends(
        mem_server: ServerProcess) -> None:
    """A forwarding TCP proxy drops some block frames on their way to a real server."""
    drop = {5, 6, 40, 99}
    dropped: list[int] = []

    async def pump_c2s(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handshaken = False
        while True:
            try:
                mtype = b"" if not handshaken else await reader.readexactly(1)
                head = await reader.readexactly(8)
            except asyncio.IncompleteReadError:
                break
            count = int.from_bytes(head[:4], "little") + 1
            table = head[4:] + await reader.readexactly(((4 + 4 * count + 7) & ~7) - 8)
            words = sum(int.from_bytes(table[i * 4:i * 4 + 4], "little") for i in range(count))
            body = await reader.readexactly(words * 8)
            handshaken = True
            if mtype == b"\x01":
                block = wire.parse_block(memoryview(body))
                assert block is not None
                if block.sequence in drop:
                    drop.discard(block.sequence)
                    dropped.append(block.sequence)
                    continue
            writer.write(mtype + head[:4] + table + body)
        writer.close()

    async def pump_s2c(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        host, port = mem_server.address.split(":")
        s_reader, s_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pump_c2s(c_reader, s_writer), pump_s2c(s_reader, c_writer),
                             return_exceptions=True)

    async def scenario() -> Any:
        proxy = await asyncio.start_server(handle, "127.0.0.1", 0)
        address = f"127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
        try:
            async with TlogClient([address], "proxied", resend_timeout=0.25) as client:
                await send_range(client, 0, 200)
                await client.wait_flushed(timeout=20)
                return client.stats()
        finally:
            proxy.close()

    stats = run(scenario())
    assert sorted(dropped) == [5, 6, 40, 99]
    assert stats.flushed_blocks == 200 and stats.resends >= 4 and stats.reconnects == 0


def test_flush_failed_makes_the_client_reconnect_and_resend_in_order() -> None:
    async def scenario(fake: FakeServer) -> tuple[Any, list[Handshake], list[int]]:
        async with TlogClient([fake.address], "v", reconnect_delay=0.01) as client:
            await send_range(client, 0, 12)
            await client.wait_flushed(timeout=10)
            return client.stats(), list(fake.handshakes), list(fake.received)

    stats, handshakes, received = with_fake(scenario, flush_failures=1)
    assert stats.reconnects == 1 and stats.flushed_blocks == 12
    assert [h.first_sequence for h in handshakes] == [0, 0]
    resent = received[received.index(11) + 1:]  # after the first pass over 0..11
    assert resent[:stats.reconnect_resends] == sorted(resent[:stats.reconnect_resends])
    assert resent[0] == 0


def test_repeated_flush_failed_reconnects_back_off() -> None:
    """Each FlushFailed costs a reconnect and a full resend: they must get rarer."""
    async def scenario(fake: FakeServer) -> tuple[Any, float]:
        async with TlogClient([fake.address], "v", reconnect_delay=0.02,
                              reconnect_max_delay=1.0) as client:
            started = time.monotonic()
            await send_range(client, 0, 5)
            await client.wait_flushed(timeout=10)
            return client.stats(), time.monotonic() - started

    stats, elapsed = with_fake(scenario, flush_failures=4)
    assert stats.reconnects == 4 and stats.flushed_blocks == 5
    assert elapsed >= 0.02 + 0.04 + 0.08 + 0.16


def test_a_mute_server_is_left_after_the_stall_timeout() -> None:
    async def scenario(fake: FakeServer) -> Any:
        async with TlogClient([fake.address], "v", resend_timeout=0.1, stall_timeout=0.4,
                              reconnect_delay=0.01) as client:
            await send_range(client, 0, 10)
            await client.wait_flushed(timeout=10)
            return client.stats()

    stats = with_fake(scenario, mute_connections=1)
    assert stats.reconnects == 1 and stats.flushed_blocks == 10


def test_full_buffer_makes_send_wait_until_flushed() -> None:
    frame_size = len(encode_block(0, 0, 0, block_data(0)))

    async def scenario(fake: FakeServer) -> None:
        async with TlogClient([fake.address], "v", max_unflushed_bytes=10 * frame_size) as client:
            sender = asyncio.create_task(send_range(client, 0, 25))
            await fake.until(lambda: len(fake.received) == 10)
            await fake.until(lambda: client.unflushed_bytes == 10 * frame_size)
            assert not sender.done()
            assert client.stats().sent_blocks == 10 and client._waiters.want_room
            fake.release()  # flushes the 10; room for 10 more, and so on
            async with asyncio.timeout(10):
                while not sender.done():
                    await fake.until(lambda: len(fake.ready) > 0 or sender.done())
                    fake.flush()
            await sender
            await client.wait_flushed(timeout=10)
            assert client.flushed_blocks == 25

    with_fake(scenario, hold_flush=True, flush_size=1000)


def test_wait_flushed_times_out_while_the_server_holds_the_blocks() -> None:
    async def scenario(fake: FakeServer) -> None:
        async with TlogClient([fake.address], "v") as client:
            await send_range(client, 0, 3)
            with pytest.raises(TimeoutError, match="not flushed"):
                await client.wait_flushed(timeout=0.2)
            fake.release()
            await client.wait_flushed(timeout=10)

    with_fake(scenario, hold_flush=True)


def test_force_flush_and_response_stream(mem_server: ServerProcess) -> None:
    async def scenario() -> list[BlockResponse]:
        async with TlogClient([mem_server.address], "stream") as client:
            stream = client.responses()
            await send_range(client, 0, 30)
            client.force_flush_at(29)  # flush-size is 25: the last 5 need the force
            seen: list[BlockResponse] = []
            flushed: set[int] = set()
            async for event in stream:
                seen.append(event)
                if event.status == BlockStatus.FLUSH_OK:
                    flushed.update(event.sequences)
                if len(flushed) == 30:
                    break
            stream.close()
            with pytest.raises(SlaveSyncError):  # no standby; a barrier all the same
                await client.wait_nbd_slave_sync(timeout=10)
            return seen

    seen = run(scenario())
    statuses = [e.status for e in seen]
    assert statuses.count(BlockStatus.RECV_OK) == 30
    assert BlockStatus.FORCE_FLUSH_RECEIVED in statuses
    assert [e.sequences for e in seen if e.status == BlockStatus.FLUSH_OK] == [
        tuple(range(25)), tuple(range(25, 30))]


def test_a_callback_that_raises_does_not_stop_the_books(mem_server: ServerProcess,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    """on_response raising on every answer: the buffer is still freed by each FlushOK (a
    buffer of 4 blocks takes 100 of them), waits end, and the error is logged."""
    frame_size = len(encode_block(0, 0, 0, block_data(0)))
    calls = 0

    def broken(status: BlockStatus | int, sequences: Sequence[int]) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("a bug in the caller's callback")

    async def scenario() -> tuple[int, int, int]:
        async with TlogClient([mem_server.address], "raising-cb", on_response=broken,
                              max_unflushed_bytes=4 * frame_size) as client:
            async with asyncio.timeout(30):
                for seq in range(100):
                    await client.send(Operation.SET, seq, seq, 0, block_data(seq))
                    client.force_flush_at(seq)
                await client.wait_flushed(timeout=10)
            return client.flushed_blocks, client.unflushed_bytes, client.callback_errors

    flushed, unflushed, errors = run(scenario())
    assert (flushed, unflushed) == (100, 0)
    assert errors == calls and calls >= 100
    assert [r for r in caplog.records if "on_response raised" in r.getMessage()]


def test_change_servers_moves_to_the_new_list(mem_server: ServerProcess) -> None:
    other = ServerProcess("--memory-storage").start()

    async def scenario() -> tuple[str | None, str | None, Any]:
        async with TlogClient([mem_server.address], "moving") as client:
            await send_range(client, 0, 30)
            await client.wait_flushed(timeout=10)
            before = client.server
            client.change_servers([other.address])
            await send_range(client, 30, 30)
            await client.wait_flushed(timeout=10)
            return before, client.server, client.stats()

    try:
        before, after, stats = run(scenario())
        other.wait_for_log(r"vdisk moving, first sequence 30", timeout=5)
    finally:
        other.kill()
    assert (before, after) == (mem_server.address, other.address)
    assert stats.flushed_blocks == 60 and stats.reconnects == 1


def test_close_fails_waiters_and_later_calls(mem_server: ServerProcess) -> None:
    async def scenario() -> None:
        client = await TlogClient.open([mem_server.address], "closing")
        await send_range(client, 0, 3)  # 3 < flush-size: stays pending on the server
        waiter = asyncio.create_task(client.wait_flushed(force=False))
        await asyncio.sleep(0)  # one loop turn: the waiter registers
        assert client._waiters.want_flushed
        await client.close()
        with pytest.raises(ClientClosedError):
            await waiter
        with pytest.raises(ClientClosedError):
            await client.send(Operation.SET, 3, 3, 0, b"x")
        await client.close()  # twice is fine

    run(scenario())


# -- crashes and failover (six real redis) ------------------------------------------------


def _outage_scenario(servers: list[ServerProcess], vdisk: str, n: int, kill_after: int,
                     down_for: float | None) -> tuple[Any, float, float]:
    """Send n blocks; SIGKILL servers[0] once kill_after are flushed; restart it after
    ``down_for`` s (None: leave it dead). Returns the stats and the CPU and wall seconds
    of the client process while no server was up."""
    async def scenario() -> tuple[Any, float, float]:
        loop = asyncio.get_running_loop()
        past = FlushedPast(kill_after)
        client = await TlogClient.open([s.address for s in servers], vdisk,
                                       reconnect_max_delay=0.25,
                                       max_unflushed_bytes=2 * 1024 * 1024,
                                       on_response=past)
        sender = asyncio.create_task(send_range(client, 0, n))
        await past.event.wait()
        servers[0].kill()
        cpu = wall = 0.0
        if down_for is not None:
            cpu0, wall0 = time.process_time(), time.monotonic()
            await asyncio.sleep(down_for)  # the outage itself
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
            await loop.run_in_executor(None, servers[0].start)
        await sender
        await client.wait_flushed(timeout=60)
        stats = client.stats()
        await client.close()
        return stats, cpu, wall

    return run(scenario(), timeout=90)


@pytest.mark.parametrize("down_for", [0.5, 3.0])
def test_sigkill_and_restart_loses_nothing_and_idles_while_down(
        redis6: list[Any], down_for: float) -> None:
    addresses = [r.address for r in redis6]
    server = ServerProcess(*storage_args(addresses)).start()
    n = 6000
    try:
        stats, cpu, wall = _outage_scenario([server], "kill9", n, 1500, down_for)
    finally:
        server.kill()
    assert stats.flushed_blocks == n and stats.unflushed_blocks == 0
    assert stats.reconnects >= 1 and stats.reconnect_resends > 0
    assert cpu < 0.1 * wall, f"client used {cpu:.3f} s CPU in {wall:.3f} s without a server"
    stored = run(stored_sequences(addresses, "kill9"))
    assert set(stored) == set(range(n))  # an aggregation stored twice is tolerated
    assert len(stored) - n <= 2 * 25 + 2 * 1024 * 1024 // 4096


def test_failover_to_a_second_server_on_the_same_storage(redis6: list[Any]) -> None:
    addresses = [r.address for r in redis6]
    first = ServerProcess(*storage_args(addresses)).start()
    second = ServerProcess(*storage_args(addresses)).start()
    n = 5000
    try:
        stats, _, _ = _outage_scenario([first, second], "failover", n, 1000, None)
    finally:
        first.kill()
        second.kill()
    assert stats.flushed_blocks == n and stats.server == second.address
    assert stats.reconnects == 1
    stored = run(stored_sequences(addresses, "failover"))
    assert set(stored) == set(range(n))


# -- the threaded facade ------------------------------------------------------------------


def test_threaded_facade_from_several_threads_keeps_each_threads_order(
        redis6: list[Any]) -> None:
    addresses = [r.address for r in redis6]
    server = ServerProcess(*storage_args(addresses)).start()
    threads, per_thread = 4, 500
    mine: dict[int, list[int]] = {t: [] for t in range(threads)}
    errors: list[BaseException] = []
    try:
        with ThreadedClient([server.address], "threads", max_unflushed_bytes=256 * 1024) as client:
            start = threading.Barrier(threads)

            def writer(tid: int) -> None:
                try:
                    start.wait(timeout=10)
                    for k in range(per_thread):
                        data = f"thread {tid} write {k:06d} ".encode().ljust(BS, b".")
                        mine[tid].append(client.send_next(Operation.SET, tid * 10_000 + k,
                                                          None, data, timeout=30))
                except BaseException as exc:  # surfaced by the main thread
                    errors.append(exc)

            workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
            for w in workers:
                w.start()
            for w in workers:
                w.join(timeout=60)
            assert not errors, errors
            client.wait_flushed(timeout=30)
            with pytest.raises(SlaveSyncError):  # no standby; a barrier all the same
                client.wait_nbd_slave_sync(timeout=10)
            stats = client.stats()
            assert client.next_sequence == threads * per_thread
        with pytest.raises(ClientClosedError):
            client.send(Operation.SET, 0, 0, None, b"late")
    finally:
        server.kill()
    assert stats.flushed_blocks == threads * per_thread and stats.unflushed_blocks == 0
    for tid, seqs in mine.items():
        assert seqs == sorted(seqs) and len(seqs) == per_thread, tid
    blocks = run(stored_blocks(addresses, "threads"))
    assert [b.sequence for b in blocks] == list(range(threads * per_thread))
    last: dict[int, int] = {}
    for block in blocks:
        tid = block.index // 10_000
        k = block.index % 10_000
        assert bytes(block.data).startswith(f"thread {tid} write {k:06d} ".encode())
        assert k == last.get(tid, -1) + 1  # each thread's writes stored in its order
        last[tid] = k


def test_threaded_facades_for_two_vdisks_at_once(mem_server: ServerProcess) -> None:
    results: dict[str, Any] = {}

    def user(vdisk: str) -> None:
        with ThreadedClient([mem_server.address], vdisk, first_sequence=100) as client:
            for seq in range(100, 400):
                client.send(Operation.SET, seq, seq, None, block_data(seq))
            client.force_flush_at(399)
            client.wait_flushed(399, timeout=30)
            results[vdisk] = client.stats()

    workers = [threading.Thread(target=user, args=(f"vd{i}",)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert sorted(results) == ["vd0", "vd1"]
    for stats in results.values():
        assert stats.flushed_blocks == 300 and stats.last_flushed == 399


def test_threaded_facade_batches_only_while_writes_keep_coming(
        mem_server: ServerProcess) -> None:
    # A batch interval far beyond the test's waits: whatever arrives in time did not wait
    # for it. A quiet client's first write goes out at once, and a flush wait takes the
    # queued writes with it.
    received: dict[int, threading.Event] = {s: threading.Event() for s in range(3)}

    def on_response(status: int, sequences: Sequence[int]) -> None:
        for seq in sequences:
            if status == 1 and seq in received:
                received[seq].set()

    with ThreadedClient([mem_server.address], "batched", batch_interval=3600,
                        on_response=on_response) as client:
        client.send_next(Operation.SET, 0, None, block_data(0))
        assert received[0].wait(10), "the first write waited for the batch interval"
        client.send_next(Operation.SET, 1, None, block_data(1))
        client.send_next(Operation.SET, 2, None, block_data(2))
        client.wait_flushed(timeout=10)
        assert received[1].is_set() and received[2].is_set()
        assert client.stats().flushed_blocks == 3
    with pytest.raises(ValueError, match="batch_interval"):
        ThreadedClient([mem_server.address], "batched", batch_interval=-1)


def test_threaded_facade_reports_connect_failures() -> None:
    with pytest.raises(ConnectionError):
        ThreadedClient([f"127.0.0.1:{pick_port()}"], "v", connect_timeout=0.3,
                       reconnect_max_delay=0.1)


# -- the subprocess helper itself -----------------------------------------------------------


def test_server_process_restarts_on_its_port_and_reports_its_exit() -> None:
    server = ServerProcess("--memory-storage")
    assert not server.running and server.address.startswith("127.0.0.1:")
    try:
        server.start()
        first_pid = server.pid
        assert server.kill() == -9 and not server.running
        server.start()  # same port, new process, listening again
        assert server.running and server.pid != first_pid and server.starts == 2
        server.wait_for_log(rf"listening on 127\.0\.0\.1:{server.port}\b", timeout=1)

        async def handshake() -> None:
            client = await TlogClient.open([server.address], "helper", timeout=5)
            await client.close()

        run(handshake())
        assert server.terminate() == 0  # SIGTERM: drained, clean exit
        assert "stopped" in server.output()
        with pytest.raises(TimeoutError):
            server.wait_for_log("no such line", timeout=0.1)
    finally:
        server.kill()
