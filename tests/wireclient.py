"""Test helpers: a raw protocol client over real sockets, a server in this process, and a
decoder of the stored chain written independently of tlog.read."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import capnp
import redis

from tlog.protocol import BlockResponse, ClientConnection, HandshakeResponse, schema
from tlog.protocol.status import BlockStatus
from tlog.protocol.wire import Block
from tlog.record.aggregation import Aggregation, Keyring, open_v2
from tlog.record.erasure import ErasureCoder
from tlogserver.config import ServerConfig
from tlogserver.server import TlogServer

KEY = "12345678901234567890123456789012"
WAIT = 15.0  # bound on every wait in these tests


class WireClient:
    """One connection speaking the protocol through the sans-I/O client core."""

    def __init__(self) -> None:
        self.core = ClientConnection()
        self.events: list[HandshakeResponse | BlockResponse] = []
        self.closed = False
        self._changed = asyncio.Event()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, port: int, vdisk: str | None = "vd", first: int = 0,
                      reset: bool = False) -> WireClient:
        self = cls()
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", port)
        self._task = asyncio.get_running_loop().create_task(self._read())
        if vdisk is not None:
            self.write(ClientConnection.send_handshake(vdisk, first, reset))
            await self.wait_for(lambda: bool(self.events), "handshake response")
        return self

    async def _read(self) -> None:
        assert self._reader is not None
        try:
            while data := await self._reader.read(65536):
                self.events.extend(self.core.receive_data(data))
                self._changed.set()
        except ConnectionError:
            pass
        self.closed = True
        self._changed.set()

    def write(self, data: bytes) -> None:
        assert self._writer is not None
        self._writer.write(data)

    def send(self, seq: int, data: bytes, index: int | None = None, timestamp: int | None = None,
             op: int = 1) -> None:
        self.write(ClientConnection.send_block(seq, seq if index is None else index,
                                               timestamp if timestamp is not None else seq,
                                               data, op))

    async def wait_for(self, condition: Callable[[], bool], what: str,
                       timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}; got {self.summary()}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def wait_flushed(self, sequences: Sequence[int] | range, timeout: float = WAIT) -> None:
        want = set(sequences)
        await self.wait_for(lambda: want <= set(self.flushed()), f"FlushOK of {len(want)} seqs",
                            timeout)

    async def wait_closed(self) -> None:
        await self.wait_for(lambda: self.closed, "connection closed")

    @property
    def handshake(self) -> HandshakeResponse:
        first = self.events[0]
        assert isinstance(first, HandshakeResponse)
        return first

    def responses(self, status: BlockStatus) -> list[tuple[int, ...]]:
        return [e.sequences for e in self.events
                if isinstance(e, BlockResponse) and e.status == status]

    def flushed(self) -> list[int]:
        return [s for group in self.responses(BlockStatus.FLUSH_OK) for s in group]

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for e in self.events:
            name = getattr(e.status, "name", str(e.status))
            counts[name] = counts.get(name, 0) + 1
        return f"{counts}, closed={self.closed}"

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, WAIT)


@contextlib.asynccontextmanager
async def running_server(storage: Sequence[str] = (), **options: Any) -> AsyncIterator[TlogServer]:
    """A TlogServer on a free loopback port in this process (real sockets, real storage)."""
    values: dict[str, Any] = {"address": "127.0.0.1:0", "flush_time": 30.0}
    if storage:
        values.update(storage_addresses=list(storage), priv_key=KEY)
    values.update(options)
    server = TlogServer(ServerConfig(**values).validate())
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown()


def port_of(server: TlogServer) -> int:
    return int(server.sockets[0].getsockname()[1])


def read_chain(addresses: Sequence[str], vdisk: str, key: str = KEY, k: int = 4,
               m: int = 2) -> list[Aggregation]:
    """Every aggregation of a vdisk, oldest first, read with plain redis clients."""
    clients = []
    for address in addresses:
        host, port = address.rsplit(":", 1)
        clients.append(redis.Redis(host=host, port=int(port)))
    coder = ErasureCoder(k, m)
    keyring = Keyring.of(key.encode())
    heads = {bytes(c.lindex(f"last_hash_{vdisk}", 0) or b"") for c in clients}
    assert len(heads) == 1, f"servers disagree on the last hash: {heads}"
    at = heads.pop()
    chain: list[Aggregation] = []
    while at and at != bytes(32):
        pieces = [c.get(at) for c in clients]
        agg = open_v2(coder.decode(pieces), keyring, expected_hash=at)
        chain.append(agg)
        at = agg.prev
    for c in clients:
        c.close()
    chain.reverse()
    return chain


def chain_blocks(chain: Sequence[Aggregation]) -> list[tuple[int, int, bytes]]:
    return [(b.sequence, b.index, bytes(b.data)) for agg in chain for b in agg.blocks]


_REFERENCE_LAYOUT: Any = None


def capnp_aggregation(blocks: Sequence[Block], prev: bytes, name: str = "tlog",
                      timestamp: int = 5, vdisk: str = "v", epoch: int = 0) -> bytes:
    """A framed aggregation laid out by pycapnp in one segment: the reference layout that
    tlog.protocol.wire's hand-laid encoder and parser are checked against. Epoch 0 is built with the
    reference's schema (tests/reference_layout.capnp: no epoch field, as the Go server
    writes), any other epoch with ours."""
    global _REFERENCE_LAYOUT
    words = sum(len(b.data) + 120 for b in blocks) // 8 + 64
    if epoch:
        msg = schema.TlogAggregation.new_message(num_first_segment_words=words)
        msg.epoch = epoch
    else:
        if _REFERENCE_LAYOUT is None:
            _REFERENCE_LAYOUT = capnp.load(str(Path(__file__).with_name(
                "reference_layout.capnp")))
        msg = _REFERENCE_LAYOUT.TlogAggregation.new_message(num_first_segment_words=words)
    msg.name, msg.size, msg.timestamp, msg.prev, msg.vdiskID = (
        name, len(blocks), timestamp, prev, vdisk)
    lst = msg.init("blocks", len(blocks))
    for i, b in enumerate(blocks):
        lst[i].sequence, lst[i].index = b.sequence, b.index
        lst[i].timestamp, lst[i].operation = b.timestamp, b.operation
        if len(b.hash):
            lst[i].hash = bytes(b.hash)
        if len(b.data):
            lst[i].data = bytes(b.data)
    return bytes(msg.to_bytes())
