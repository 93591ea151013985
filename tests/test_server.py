"""The write path end to end: real sockets into a TlogServer, real redis-server storage."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Coroutine
from typing import Any

import pytest

from tlog.protocol import ClientConnection, ServerConnection
from tlog.protocol.status import BlockStatus, HandshakeStatus
from tlog.protocol.version import Stage, Version

from .vectors import WIRE_CAPTURES, wire
from .wireclient import WireClient, chain_blocks, port_of, read_chain, running_server


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def block_data(seq: int) -> bytes:
    return hashlib.sha256(seq.to_bytes(8, "little")).digest() * 128  # 4 KiB, distinct per seq


@pytest.mark.parametrize("name", WIRE_CAPTURES)
def test_go_client_stream_gets_the_go_servers_responses(name: str, redis6: list[Any]) -> None:
    c2s, _, manifest = wire(name)
    frames = manifest["s2c_frames"][1:]  # after the handshake response
    want_recv = sorted(s for f in frames if f["decoded"].get("status") == 1
                       for s in f["decoded"]["sequences"])
    want_flush = [f["decoded"]["sequences"] for f in frames if f["decoded"].get("status") == 2]
    want_force = sum(1 for f in frames if f["decoded"]["status"] == 3)
    addresses = [r.address for r in redis6]

    async def scenario() -> None:
        async with running_server(addresses) as server:
            client = await WireClient.connect(port_of(server), vdisk=None)
            client.write(c2s)  # handshake first, then everything else, as the Go client sent it
            await client.wait_flushed([s for group in want_flush for s in group])
            assert client.handshake.status == HandshakeStatus.OK
            assert sorted(s for g in client.responses(BlockStatus.RECV_OK) for s in g) == want_recv
            assert [list(g) for g in client.responses(BlockStatus.FLUSH_OK)] == want_flush
            assert len(client.responses(BlockStatus.FORCE_FLUSH_RECEIVED)) == want_force
            await client.close()

    run(scenario())
    sent = [e for e in ServerConnection().receive_data(c2s)[1:] if hasattr(e, "data")]
    stored = chain_blocks(read_chain(addresses, "myimg"))
    assert stored == [(b.sequence, b.index, bytes(b.data)) for b in sent]


def test_permuted_duplicated_sequences_flush_once_in_order(redis6: list[Any]) -> None:
    addresses = [r.address for r in redis6]
    order = list(range(1000)) * 2
    random.Random(42).shuffle(order)

    async def scenario() -> list[tuple[int, ...]]:
        async with running_server(addresses) as server:
            client = await WireClient.connect(port_of(server))
            for seq in order:
                client.send(seq, block_data(seq))
            await client.wait_flushed(range(1000))
            groups = client.responses(BlockStatus.FLUSH_OK)
            await client.close()
            return groups

    groups = run(scenario())
    flushed = [s for g in groups for s in g]
    # a duplicate of an already stored block may be answered FlushOK again on its own;
    # every aggregation holds exactly flush-size (25) sequences, in order
    assert [g for g in groups if len(g) > 1] == [
        tuple(range(i, i + 25)) for i in range(0, 1000, 25)]
    assert sorted(set(flushed)) == list(range(1000))
    chain = read_chain(addresses, "vd")
    assert len(chain) == 40
    assert chain_blocks(chain) == [(s, s, block_data(s)) for s in range(1000)]
    for older, newer in zip(chain, chain[1:], strict=False):
        assert newer.prev == older.hash
    assert chain[0].prev == bytes(32)


def test_flush_by_time(redis6: list[Any]) -> None:
    async def scenario() -> None:
        async with running_server([r.address for r in redis6], flush_time=0.3) as server:
            client = await WireClient.connect(port_of(server))
            for seq in range(10):
                client.send(seq, block_data(seq))
            await client.wait_flushed(range(10), timeout=10)
            assert client.responses(BlockStatus.FLUSH_OK) == [tuple(range(10))]
            await client.close()

    run(scenario())


def test_force_flush_before_and_after_the_sequence_arrives(redis6: list[Any]) -> None:
    async def scenario() -> None:
        async with running_server([r.address for r in redis6]) as server:
            client = await WireClient.connect(port_of(server))
            for seq in range(5):
                client.send(seq, block_data(seq))
            client.write(ClientConnection.send_force_flush(9))  # not received yet
            await client.wait_for(lambda: bool(client.responses(
                BlockStatus.FORCE_FLUSH_RECEIVED)), "ForceFlushReceived")
            await asyncio.sleep(0)  # nothing may be flushed before 9 arrives
            assert client.flushed() == []
            for seq in range(5, 12):
                client.send(seq, block_data(seq))
            await client.wait_flushed(range(10))
            # sequence 9 completes the flush; 10 and 11 may ride along in the same read
            first = client.responses(BlockStatus.FLUSH_OK)[0]
            assert first[:10] == tuple(range(10))
            pending = [s for s in range(10, 12) if s not in client.flushed()]
            client.write(ClientConnection.send_force_flush(10))  # already received
            await client.wait_flushed(pending)
            assert sorted(client.flushed()) == list(range(12))
            await client.close()

    run(scenario())


def test_reset_first_sequence(redis6: list[Any]) -> None:
    addresses = [r.address for r in redis6]

    async def scenario() -> None:
        async with running_server(addresses) as server:
            first = await WireClient.connect(port_of(server))
            for seq in range(10):
                first.send(seq, block_data(seq))
            first.send(20, block_data(20))  # out of order: dropped by the reset
            await first.wait_for(lambda: len(first.responses(BlockStatus.RECV_OK)) == 11,
                                 "RecvOK x11")
            second = await WireClient.connect(port_of(server), first=100, reset=True)
            assert second.handshake.status == HandshakeStatus.OK
            await first.wait_closed()  # the other client is disconnected
            for seq in range(100, 125):
                second.send(seq, block_data(seq))
            await second.wait_flushed(range(100, 125))
            # The ordered blocks of the old epoch were flushed, but their FlushOK is not the
            # new client's: in its numbering those sequences are other writes.
            assert not {s for g in second.responses(BlockStatus.FLUSH_OK) for s in g} & set(
                range(10))
            await second.close()

    run(scenario())
    chain = read_chain(addresses, "vd")
    stored = [s for s, _, _ in chain_blocks(chain)]
    assert stored == list(range(10)) + list(range(100, 125))
    assert [agg.epoch for agg in chain] == [0, 1]  # the reset started epoch 1


def test_two_connections_on_one_vdisk_both_get_every_flush(redis6: list[Any]) -> None:
    async def scenario() -> None:
        async with running_server([r.address for r in redis6]) as server:
            a = await WireClient.connect(port_of(server))
            b = await WireClient.connect(port_of(server))
            for seq in range(50):
                (a if seq % 2 else b).send(seq, block_data(seq))
            await a.wait_flushed(range(50))
            await b.wait_flushed(range(50))
            assert a.responses(BlockStatus.FLUSH_OK) == b.responses(BlockStatus.FLUSH_OK)
            assert sorted(s for g in a.responses(BlockStatus.RECV_OK) for s in g) == list(
                range(1, 50, 2))
            await a.close()
            await b.close()

    run(scenario())


def test_wrong_hash_gets_recv_failed_and_keeps_the_connection(redis6: list[Any]) -> None:
    addresses = [r.address for r in redis6]

    async def scenario() -> None:
        async with running_server(addresses, flush_size=3) as server:
            client = await WireClient.connect(port_of(server))
            client.send(0, block_data(0))
            client.write(ClientConnection.send_block(1, 1, 1, block_data(1), hash=bytes(32)))
            await client.wait_for(lambda: client.responses(BlockStatus.RECV_FAILED) == [(1,)],
                                  "RecvFailed")
            client.send(1, block_data(1))  # the resend with the right hash
            client.send(2, block_data(2))
            await client.wait_flushed(range(3))
            assert not client.closed
            await client.close()

    run(scenario())
    assert [s for s, _, _ in chain_blocks(read_chain(addresses, "vd"))] == [0, 1, 2]


def test_duplicate_of_a_stored_block_is_answered_flush_ok(redis6: list[Any]) -> None:
    async def scenario() -> None:
        async with running_server([r.address for r in redis6], flush_size=5) as server:
            client = await WireClient.connect(port_of(server))
            for seq in range(5):
                client.send(seq, block_data(seq))
            await client.wait_flushed(range(5))
            client.send(3, block_data(3))
            await client.wait_for(lambda: client.responses(BlockStatus.FLUSH_OK)[-1] == (3,),
                                  "FlushOK for the resent block")
            await client.close()

    run(scenario())


def test_eof_before_handshake_is_answered_invalid_request() -> None:
    async def scenario() -> None:
        async with running_server() as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            writer.write_eof()
            data = await asyncio.wait_for(reader.read(), 10)
            assert data == ServerConnection.send_handshake_response(
                HandshakeStatus.INVALID_REQUEST)
            writer.close()

    run(scenario())


def test_bad_handshakes_are_refused_with_their_status() -> None:
    old = Version(1, 0, 9, Stage.LIVE).to_uint32()

    async def scenario() -> None:
        async with running_server() as server:
            port = port_of(server)
            client = await WireClient.connect(port, vdisk=None)
            client.write(ClientConnection.send_handshake("vd", 0, version=old))
            await client.wait_closed()
            assert client.handshake.status == HandshakeStatus.INVALID_VERSION
            client = await WireClient.connect(port, vdisk="bad id\n")
            await client.wait_closed()
            assert client.handshake.status == HandshakeStatus.INVALID_VDISK_ID
            client = await WireClient.connect(port, vdisk=None)
            client.write(b"\xff" * 64)  # garbage instead of a handshake
            await client.wait_closed()
            assert client.handshake.status == HandshakeStatus.INVALID_REQUEST
            assert not server.vdisks

    run(scenario())


def test_bad_client_does_not_disturb_another_vdisk(redis6: list[Any]) -> None:
    async def scenario() -> None:
        async with running_server([r.address for r in redis6]) as server:
            good = await WireClient.connect(port_of(server), vdisk="good")
            bad = await WireClient.connect(port_of(server), vdisk="bad")
            for seq in range(30):
                good.send(seq, block_data(seq))
                if seq == 10:
                    bad.write(b"\x07" + b"\0" * 32)  # unknown message type
            await bad.wait_closed()
            good.write(ClientConnection.send_force_flush(29))
            await good.wait_flushed(range(30))
            assert not good.closed
            await good.close()

    run(scenario())


def test_out_of_order_window_refuses_far_ahead_blocks() -> None:
    async def scenario() -> None:
        async with running_server(max_buffered_blocks=100, flush_size=5) as server:
            client = await WireClient.connect(port_of(server))
            client.send(500, block_data(500))  # beyond the window: not kept
            client.send(50, block_data(50))  # within: kept
            await client.wait_for(lambda: len(client.events) == 3, "two answers")
            assert client.responses(BlockStatus.RECV_FAILED) == [(500,)]
            assert client.responses(BlockStatus.RECV_OK) == [(50,)]
            for seq in range(50):
                client.send(seq, block_data(seq))
            await client.wait_flushed(range(50))
            await client.close()

    run(scenario())


def test_wait_nbd_slave_sync_without_a_standby_fails_at_once() -> None:
    # No standby exists: "received" would be a promise nobody keeps.
    async def scenario() -> None:
        async with running_server() as server:
            client = await WireClient.connect(port_of(server))
            client.write(ClientConnection.send_wait_nbd_slave_sync())
            await client.wait_for(lambda: bool(client.responses(
                BlockStatus.WAIT_NBD_SLAVE_SYNC_FAILED)), "WaitNbdSlaveSync failure")
            assert not client.responses(BlockStatus.WAIT_NBD_SLAVE_SYNC_RECEIVED)
            await client.close()

    run(scenario())


def test_memory_storage_is_the_default(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with running_server() as server:
            assert server.factory.is_memory
            client = await WireClient.connect(port_of(server))
            client.send(0, block_data(0))
            client.write(ClientConnection.send_force_flush(0))
            await client.wait_flushed([0])
            await client.close()

    with caplog.at_level("WARNING"):
        run(scenario())
    assert "will NOT survive a restart" in caplog.text
    assert "random key" in caplog.text


def test_storage_failure_answers_flush_failed_then_recovers(redis6: list[Any]) -> None:
    addresses = [r.address for r in redis6]

    async def scenario() -> None:
        async with running_server(addresses) as server:
            client = await WireClient.connect(port_of(server))
            client.send(0, block_data(0))
            client.write(ClientConnection.send_force_flush(0))
            await client.wait_flushed([0])  # the vdisk is open and its chain known
            # Two of six down leaves k=4 pieces: fewer than the k+1 a flush needs (one
            # server down would be a degraded flush, answered FlushOK).
            redis6[2].stop()
            redis6[3].stop()
            for seq in range(1, 26):
                client.send(seq, block_data(seq))
            await client.wait_for(lambda: bool(client.responses(BlockStatus.FLUSH_FAILED)),
                                  "FlushFailed")
            assert client.responses(BlockStatus.FLUSH_FAILED)[0] == tuple(range(1, 26))
            assert not client.closed
            redis6[2].start()
            redis6[3].start()
            await client.wait_flushed(range(1, 26))  # retried by the server, nothing lost
            await client.close()

    run(scenario())
    assert [s for s, _, _ in chain_blocks(read_chain(addresses, "vd"))] == list(range(26))


def test_background_tasks_are_kept_logged_and_awaited_at_stop(
        caplog: pytest.LogCaptureFixture) -> None:
    """The daemon's fire-and-forget tasks: a failure is logged under the task's name (not
    "Task exception was never retrieved"), a stop waits for what is running and cancels
    what outlives the wait."""
    import logging

    from tlogserver.tasks import BackgroundTasks

    async def scenario() -> tuple[bool, bool]:
        tasks = BackgroundTasks(logging.getLogger("tlogserver"))
        finished = asyncio.Event()

        async def fails() -> None:
            raise RuntimeError("storage said no")

        async def quick() -> None:
            await asyncio.sleep(0.01)
            finished.set()

        async def hangs() -> None:
            await asyncio.Event().wait()

        tasks.start(fails(), "releasing the ownership of vd")
        tasks.start(quick(), "stopping the flusher of vd")
        hung = tasks.start(hangs(), "handshake of conn#1")
        assert len(tasks) == 3
        await tasks.close(0.2)
        return finished.is_set(), hung.cancelled()

    finished, cancelled = run(scenario())
    assert finished and cancelled
    failed = [r for r in caplog.records if "releasing the ownership of vd failed" in
              r.getMessage()]
    assert failed and failed[0].exc_info is not None
