"""Answers to clients that write one block at a time (issue 17): held for ``ack_delay`` and
written together, never reordered, never lost; a streaming client's reads paused until the
held answers go out, and a client that asks for a flush never kept waiting. Then the storage
round written at once on each server's open connection: a server that lost its script cache
is stored again in the same round, not counted missing.

The core of the holding is checked in process against a transport that records its writes
(deterministic), the rest against a real server over real sockets and real redis-servers.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

import pytest

from benchmarks.server_path import feed
from tlog.protocol import BlockResponse, ClientConnection, ServerConnection
from tlog.protocol.status import BlockStatus, HandshakeStatus
from tlogserver.acks import STREAMING_BLOCKS
from tlogserver.config import ServerConfig
from tlogserver.connection import TlogConnection
from tlogserver.server import TlogServer

from .redis_fixture import RedisProcess
from .test_reliability import markers, read_args, send, tlog
from .wireclient import WireClient, port_of, read_chain, running_server

WAIT = 15.0
DATA = b"tlog" * 1024


class Recorder:
    """A transport that keeps what is written, and whether reading is paused."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.paused = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def answers(writes: list[bytes]) -> list[tuple[int, list[int]]]:
    """(status, sequences) of every block answer in ``writes``, in order."""
    core = ClientConnection()  # (it reads a handshake answer first)
    out = []
    opening = ServerConnection.send_handshake_response(HandshakeStatus.OK)
    for event in core.receive_data(opening + b"".join(writes)):
        if isinstance(event, BlockResponse):
            out.append((int(event.status), list(event.sequences)))
    return out


async def connected(ack_delay: float, flush_size: int = 25) -> tuple[TlogConnection, Recorder]:
    config = ServerConfig(address="127.0.0.1:0", memory_storage=True, flush_size=flush_size,
                          flush_time=600.0, ack_delay=ack_delay).validate()
    conn = TlogConnection(TlogServer(config))
    transport = Recorder()
    conn.connection_made(transport)
    feed(conn, ClientConnection.send_handshake("vd", 0))
    for _ in range(100):  # the handshake is answered by a task
        if transport.writes:
            break
        await asyncio.sleep(0.001)
    transport.writes.clear()
    return conn, transport


async def until_released(conn: TlogConnection) -> None:
    """Wait (bounded) until the answers held on ``conn`` have been written."""
    async with asyncio.timeout(WAIT):
        while conn.acks.held_bytes:
            await asyncio.sleep(0.005)


def block(seq: int) -> bytes:
    return ClientConnection.send_block(seq, seq, time.time_ns(), DATA)


def test_answers_of_single_block_reads_are_held_and_written_together() -> None:
    async def scenario() -> None:
        conn, transport = await connected(ack_delay=0.05)
        await asyncio.sleep(0.06)  # a quiet spell: ack_delay since the handshake's answer
        feed(conn, block(0))  # the first answer after a quiet spell goes out at once
        assert len(transport.writes) == 1
        for seq in range(1, 10):
            feed(conn, block(seq))
        assert len(transport.writes) == 1  # held: written less than ack_delay ago
        await until_released(conn)
        assert len(transport.writes) == 2  # one write for the nine held answers
        assert answers(transport.writes) == [(BlockStatus.RECV_OK, [s]) for s in range(10)]
    asyncio.run(scenario())


def test_held_answers_go_out_before_a_flush_ok_and_nothing_is_reordered() -> None:
    async def scenario() -> None:
        conn, transport = await connected(ack_delay=0.5, flush_size=5)
        for seq in range(12):
            feed(conn, block(seq))
        for _ in range(200):  # the flusher stores two aggregations (memory storage)
            if sum(status == BlockStatus.FLUSH_OK for status, _ in answers(
                    transport.writes)) >= 2:
                break
            await asyncio.sleep(0.005)
        got = answers(transport.writes)
        flushed = [s for status, seqs in got if status == BlockStatus.FLUSH_OK for s in seqs]
        assert flushed == list(range(10))
        # Every FlushOK comes after the RecvOK of its blocks, although those were held.
        seen_recv: set[int] = set()
        for status, seqs in got:
            if status == BlockStatus.RECV_OK:
                seen_recv.update(seqs)
            elif status == BlockStatus.FLUSH_OK:
                assert set(seqs) <= seen_recv
        assert len(transport.writes) < 12
    asyncio.run(scenario())


def test_no_holding_with_ack_delay_zero_nor_for_big_reads() -> None:
    async def scenario() -> None:
        conn, transport = await connected(ack_delay=0.0)
        for seq in range(5):
            feed(conn, block(seq))
        assert len(transport.writes) == 5
        conn, transport = await connected(ack_delay=0.5)
        stream = b"".join(block(seq) for seq in range(200))
        size = len(block(0))
        at = 0
        while True:  # reads that fill the buffer make it grow, as recv's would
            buf = conn.get_buffer(len(stream) - at)
            n = len(buf) // size
            if n >= 8:
                break
            buf[:len(buf)] = stream[at:at + len(buf)]
            conn.buffer_updated(len(buf))
            at += len(buf)
        await until_released(conn)  # whatever was held went out
        before = len(answers(transport.writes))
        count = len(transport.writes)
        whole = (at // size + n) * size - at  # up to the end of the n-th next block
        buf[:whole] = stream[at:at + whole]
        conn.buffer_updated(whole)  # a read of n blocks, n >= 8: answered at once
        assert len(transport.writes) == count + 1
        got = answers(transport.writes)[before:]
        assert [status for status, _ in got] == [BlockStatus.RECV_OK] * len(got)
    asyncio.run(scenario())


def test_a_streaming_client_is_read_in_batches_and_a_flush_request_is_not_held_back() -> None:
    async def scenario() -> None:
        conn, transport = await connected(ack_delay=0.05)
        for seq in range(STREAMING_BLOCKS + 1):
            feed(conn, block(seq))
        # Streaming: reading pauses until the held answers are written. (A read that ends
        # the connection's turn on the loop also pauses, until the next iteration: on a slow
        # machine 65 reads can reach READ_TURN_SECONDS, so look after one iteration.)
        await asyncio.sleep(0)
        assert transport.paused
        async with asyncio.timeout(WAIT):
            while transport.paused:
                await asyncio.sleep(0.005)
        assert answers(transport.writes)
        # A client that asks for a flush waits for it: its reads are not paused after it.
        feed(conn, ClientConnection.send_force_flush(STREAMING_BLOCKS))
        feed(conn, block(STREAMING_BLOCKS + 1))
        await asyncio.sleep(0)
        assert not transport.paused
    asyncio.run(scenario())


def test_a_client_writing_one_block_per_send_gets_every_answer(
        redis6: list[RedisProcess]) -> None:
    """Over real sockets: 400 blocks, one send() each, then a flush; every RecvOK and
    FlushOK arrives, RecvOK first, with nothing refused; then a client that flushes after
    every block (a synchronous writer) gets each FlushOK."""
    addresses = [r.address for r in redis6]

    async def scenario() -> None:
        async with running_server(addresses, ack_delay=0.001) as server:
            sock = socket.create_connection(("127.0.0.1", port_of(server)), timeout=WAIT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(sock, ClientConnection.send_handshake("vd", 0))
            for seq in range(400):
                await loop.sock_sendall(sock, block(seq))
            await loop.sock_sendall(sock, ClientConnection.send_force_flush(399))
            core, got = ClientConnection(), []
            flushed: set[int] = set()
            async with asyncio.timeout(WAIT):
                while len(flushed) < 400:
                    data = await loop.sock_recv(sock, 1 << 16)
                    assert data, "the server closed the connection"
                    for event in core.receive_data(data):
                        if isinstance(event, BlockResponse):
                            got.append((event.status, list(event.sequences)))
                            if event.status == BlockStatus.FLUSH_OK:
                                flushed.update(event.sequences)
            sock.close()
            statuses = {status for status, _ in got}
            assert statuses <= {BlockStatus.RECV_OK, BlockStatus.FLUSH_OK,
                                BlockStatus.FORCE_FLUSH_RECEIVED}, got
            received = [s for status, seqs in got if status == BlockStatus.RECV_OK
                        for s in seqs]
            assert sorted(received) == list(range(400))

            sync = await WireClient.connect(port_of(server), "vd-sync")
            for seq in range(30):
                send(sync, range(seq, seq + 1))
                sync.write(ClientConnection.send_force_flush(seq))
                await sync.wait_flushed(range(seq, seq + 1))
            await sync.close()
    asyncio.run(scenario())


def test_a_server_that_lost_its_script_cache_is_stored_again_in_the_same_round(
        redis6: list[RedisProcess]) -> None:
    addresses = [r.address for r in redis6]

    async def scenario() -> None:
        async with running_server(addresses) as server:
            client = await WireClient.connect(port_of(server))
            send(client, range(0, 50))
            await client.wait_flushed(range(0, 50))
            for r in redis6[:2]:
                r.client().script_flush()  # as after a restart: EVALSHA finds nothing
            send(client, range(50, 100))
            await client.wait_flushed(range(50, 100))
            assert not client.responses(BlockStatus.FLUSH_FAILED)
            await client.close()
    asyncio.run(scenario())
    assert not any(markers(r) for r in redis6)  # no piece was counted missing
    proc = tlog("verify", *read_args(addresses))
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stdout + proc.stderr


def test_reading_pauses_for_a_turn_of_the_loop_after_its_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads that took `READ_TURN_SECONDS` (here any read) pause reading until the event
    loop's next turn, when it resumes, unless it is paused for another reason."""
    import tlogserver.connection as connection

    monkeypatch.setattr(connection, "READ_TURN_SECONDS", 0.0)

    async def scenario() -> None:
        conn, transport = await connected(ack_delay=0.0)
        feed(conn, block(0))
        assert transport.paused  # the loop runs timers and other connections first
        await asyncio.sleep(0)
        assert not transport.paused
        feed(conn, block(1))
        conn.pause_writing()  # the client does not read its answers meanwhile
        await asyncio.sleep(0)
        assert transport.paused  # still: for that other reason
        conn.resume_writing()
        assert not transport.paused
        assert answers(transport.writes) == [(BlockStatus.RECV_OK, [0]),
                                             (BlockStatus.RECV_OK, [1])]
        conn.close("done")
    asyncio.run(scenario())


@pytest.mark.parametrize("block_size", [4096, 65536])
def test_large_aggregations_sealed_in_steps_are_stored_and_read_back(
        redis6: list[RedisProcess], block_size: int) -> None:
    """Aggregations of 100 random 4 KiB blocks (400 KB: sealed and erasure-coded in steps,
    the event loop running between them, and written a server at a time) read back
    exactly; so do aggregations of 100 blocks of 64 KiB (6.6 MB: their biggest steps run
    in a thread)."""
    addresses = [r.address for r in redis6]
    payload = {seq: os.urandom(block_size) for seq in range(300)}

    async def scenario() -> None:
        async with running_server(addresses, flush_size=100, block_size=block_size) as server:
            client = await WireClient.connect(port_of(server))
            for seq in range(300):
                client.send(seq, payload[seq])
            await client.wait_flushed(range(300))
            assert not client.responses(BlockStatus.FLUSH_FAILED)
            await client.close()
    asyncio.run(scenario())
    chain = read_chain(addresses, "vd")
    assert [len(agg.blocks) for agg in chain] == [100, 100, 100]
    assert {b.sequence: bytes(b.data) for agg in chain for b in agg.blocks} == payload
    proc = tlog("verify", *read_args(addresses))
    assert proc.returncode == 0, proc.stdout + proc.stderr
