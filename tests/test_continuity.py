"""No acknowledged write is lost when a client numbers its sequences anew (issue 11).

A client that starts again at sequence 0 on a vdisk with a log (0-Disk's NBD server does,
every time it starts) gets a new epoch: its writes are acknowledged and a restore replays
them over the older ones. A client can also ask where the log ends and continue there.
Everything runs against real tlogserver processes and real redis servers.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import pytest

from tlog.client import ThreadedClient, TlogClient
from tlog.protocol import ClientConnection, block_hash
from tlog.protocol.status import BlockStatus, Operation
from tlog.protocol.wire import Block

from .redis_fixture import RedisProcess
from .serverproc import pick_port, start_server
from .test_cli_read import (
    BLOCK_SIZE,
    KEY,
    WAIT,
    Client,
    image,
    read_args,
    start_tlogserver,
    tlog_cli,
)
from .test_decoder import TS0, ChainWriter
from .wireclient import WireClient, port_of, running_server

BLOCKS = 16


def session(tag: bytes, first: int = 0, count: int = BLOCKS, ts: int = TS0) -> list[Block]:
    """``count`` writes from sequence ``first`` to indexes 0.., their data marked ``tag``."""
    out = []
    for i in range(count):
        data = (tag + b"-%d-" % i).ljust(BLOCK_SIZE, b".")
        out.append(Block(first + i, i, ts + i, Operation.SET, block_hash(data), data))
    return out


def restored(redis6: Sequence[RedisProcess], tmp_path: Path, vdisk: str, *extra: str) -> bytes:
    out = tmp_path / f"{vdisk}-{len(list(tmp_path.iterdir()))}.img"
    tlog_cli("restore", *read_args(redis6, vdisk), *extra, "--output", str(out))
    return out.read_bytes()


async def send_with_client(port: int, vdisk: str, blocks: Sequence[Block],
                           first_sequence: int | None = 0) -> TlogClient:
    client = await TlogClient.open([f"127.0.0.1:{port}"], vdisk, first_sequence, timeout=WAIT)
    for b in blocks:
        await client.send(b.operation, b.sequence, b.index, b.timestamp, b.data)
    await client.wait_flushed(blocks[-1].sequence, timeout=WAIT)
    await client.close()
    return client


@pytest.mark.parametrize("restart", [False, True], ids=["same-server", "restarted-server"])
def test_our_client_twice_from_zero_restores_the_second_session(
        redis6: list[RedisProcess], tmp_path: Path, restart: bool) -> None:
    first, second = session(b"first"), session(b"second", ts=TS0 + 10**9)
    with start_tlogserver(redis6, KEY) as server:
        asyncio.run(send_with_client(server.port, "vd", first))
        if restart:
            server.restart()
        client = asyncio.run(send_with_client(server.port, "vd", second))
        assert client.flushed_blocks == BLOCKS  # every write of the second one acknowledged
        assert client.log_position is not None and client.log_position.has_log
        assert client.log_position.last_sequence == BLOCKS - 1
        server.wait_for_log("epoch 1 starts at sequence 0", any_run=True)
    assert restored(redis6, tmp_path, "vd") == image(second)
    proc = tlog_cli("verify", *read_args(redis6, "vd"))
    assert "chain sound" in proc.stdout and "2 epochs" in proc.stdout
    assert re.search(r"epoch 1: from aggregation [0-9a-f]{64} \(sequence 0\)", proc.stderr)


@pytest.mark.parametrize("restart", [False, True], ids=["same-server", "restarted-server"])
def test_go_client_frames_twice_from_zero_restore_the_second_session(
        redis6: list[RedisProcess], tmp_path: Path, restart: bool) -> None:
    """What 0-Disk's Go client sends when its NBD server restarts: a handshake with first
    sequence 0 and no reset, then the new writes; here even with the same timestamps."""
    first, second = session(b"first"), session(b"second")
    with start_tlogserver(redis6, KEY) as server:
        for blocks in (first, second):
            client = Client(server.port, "go", 0)
            for b in blocks:
                client.send(b)
            client.force_flush(BLOCKS - 1)
            client.wait_flushed(range(BLOCKS))  # and no RecvFailed / FlushFailed
            client.close()
            if restart and blocks is first:
                server.restart()
    assert restored(redis6, tmp_path, "go") == image(second)


def test_resends_after_a_reconnect_are_not_a_new_epoch(redis6: list[RedisProcess],
                                                       tmp_path: Path) -> None:
    """A Go client that lost its FlushOKs reconnects below the stored log and resends the
    same blocks: they are acknowledged from storage, stored once, no epoch begins."""
    blocks = session(b"once", count=40)
    with start_tlogserver(redis6, KEY) as server:
        client = Client(server.port, "re", 0)
        for b in blocks:
            client.send(b)
        client.force_flush(39)
        client.wait_flushed(range(40))
        client.close()
        server.restart()
        client = Client(server.port, "re", 10)  # as if FlushOK of 10..39 had been lost
        for b in blocks[10:]:
            client.send(b)
        client.wait_flushed(range(10, 40))
        client.close()
    proc = tlog_cli("verify", *read_args(redis6, "re"))
    assert "chain sound: 2 aggregations, 40 blocks, sequences 0..39" in proc.stdout
    assert "epoch" not in proc.stdout + proc.stderr
    assert restored(redis6, tmp_path, "re") == image(blocks)


def test_first_sequence_none_continues_the_log(redis6: list[RedisProcess],
                                               tmp_path: Path) -> None:
    with start_tlogserver(redis6, KEY) as server:
        new = asyncio.run(send_with_client(server.port, "cont", session(b"a", count=10), None))
        assert new.first_sequence == 0  # a vdisk without a log starts at 0
        assert new.log_position is not None and not new.log_position.has_log
        server.restart()
        later = session(b"b", first=10, count=10)
        cont = asyncio.run(send_with_client(server.port, "cont", later, None))
        assert cont.first_sequence == 10 and cont.log_position is not None
        assert cont.log_position.last_sequence == 9 and cont.log_position.epoch == 0
        # The threaded client too: send_next numbers from where the log ends.
        with ThreadedClient([server.address], "cont", None, connect_timeout=WAIT) as threaded:
            assert threaded.first_sequence == threaded.next_sequence == 20
            data = b"c".ljust(BLOCK_SIZE, b".")
            assert threaded.send_next(Operation.SET, 3, TS0, data) == 20
            threaded.wait_flushed(20, timeout=WAIT)
    assert restored(redis6, tmp_path, "cont") == image(
        session(b"a", count=10) + later
        + [Block(20, 3, TS0, Operation.SET, block_hash(data), data)])
    proc = tlog_cli("verify", *read_args(redis6, "cont"))
    assert "chain sound" in proc.stdout and "sequences 0..20" in proc.stdout
    assert "epoch" not in proc.stdout


def test_tlog_send_continue(redis6: list[RedisProcess]) -> None:
    with start_tlogserver(redis6, KEY) as server:
        runs = [json.loads(tlog_cli("send", "--server", server.address, "--vdisk", "snd",
                                    "--blocks", "30", "--continue").stdout)
                for _ in range(2)]
        assert [r["first_sequence"] for r in runs] == [0, 30]
        assert tlog_cli("send", "--server", server.address, "--vdisk", "snd", "--continue",
                        "--first-sequence", "5", check=False).returncode == 2
        # --continue --reset: a new epoch, numbered on from the log's end
        again = json.loads(tlog_cli("send", "--server", server.address, "--vdisk", "snd",
                                    "--blocks", "10", "--continue", "--reset").stdout)
        assert again["first_sequence"] == 60
        server.wait_for_log("epoch 1 starts at sequence 60")
    proc = tlog_cli("verify", *read_args(redis6, "snd"))
    assert "70 blocks, sequences 60..69 (of epoch 1; 2 epochs)" in proc.stdout


def test_rollback_by_sequence_names_an_epoch(redis6: list[RedisProcess],
                                             tmp_path: Path) -> None:
    first, second = session(b"first"), session(b"second", ts=TS0 + 10**9)
    with start_tlogserver(redis6, KEY) as server:
        asyncio.run(send_with_client(server.port, "rb", first))
        asyncio.run(send_with_client(server.port, "rb", second))
    # Default: the last epoch's numbering; the first epoch is replayed whole before it
    # (image() applies by sequence: the second session's are moved past the first's).
    assert restored(redis6, tmp_path, "rb", "--end-sequence", "7") == image(
        first + [Block(100 + b.sequence, b.index, b.timestamp, b.operation, b.hash, b.data)
                 for b in second[:8]])
    # An older epoch: replayed up to its sequence, nothing after it.
    assert restored(redis6, tmp_path, "rb", "--epoch", "0", "--end-sequence", "7") == image(
        first[:8])
    # The rest of epoch 1 on top of the rollback gives the whole log.
    out = tmp_path / "rest.img"
    tlog_cli("restore", *read_args(redis6, "rb"), "--end-sequence", "7", "--output", str(out))
    tlog_cli("restore", *read_args(redis6, "rb"), "--start-sequence", "8", "--keep-existing",
             "--output", str(out))
    assert out.read_bytes() == image(second)
    assert tlog_cli("restore", *read_args(redis6, "rb"), "--epoch", "0", "--output",
                    str(out), check=False).returncode != 0  # --epoch alone means nothing


def test_verify_reports_sequences_reused_without_epochs(redis6: list[RedisProcess]) -> None:
    """Storage written by a server without epochs (0-Disk's, or ours before them) where a
    client started again at 0: verify names the writes a restore drops."""
    writer = ChainWriter(redis6, "old")
    writer.append(session(b"first", count=8))
    writer.append(session(b"again", count=8, ts=TS0 + 10**9))
    proc = tlog_cli("verify", *read_args(redis6, "old"), check=False)
    assert proc.returncode == 1
    assert "8 sequence(s) of epoch 0 reused for different data (0, 1, 2" in proc.stderr


def test_max_connections_refuses_at_accept() -> None:
    metrics = pick_port()
    with start_server("--memory-storage", "--max-connections", "2", "--metrics-address",
                      f"127.0.0.1:{metrics}") as server:
        first, second = Client(server.port, "a", 0), Client(server.port, "b", 0)
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
        try:
            extra.sendall(ClientConnection.send_handshake("c", 0))
            answer = extra.recv(100)
        except ConnectionResetError:  # aborted at accept: a reset, no answer
            answer = b""
        assert answer == b""
        extra.close()
        server.wait_for_log(r"refused: 2 connections open \(max-connections\)")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics",
                                    timeout=WAIT) as resp:
            text = resp.read().decode()
        assert re.search(r"^tlog_connections_refused_total 1\.0$", text, re.M)
        first.close()
        # One left: a new client gets in again (the server may need a moment to see the
        # close: try a few times).
        for _ in range(50):
            try:
                third = Client(server.port, "c", 0)
                break
            except AssertionError:
                continue
        else:
            raise AssertionError("no connection accepted after one closed")
        third.close()
        second.close()


def test_server_wide_buffer_cap(redis6: list[RedisProcess]) -> None:
    """With storage down, what one vdisk holds counts against the whole server: another
    vdisk's blocks get RecvFailed once the cap is reached, and are taken once it frees."""
    addresses = [r.address for r in redis6]
    data = b"x" * 4096

    async def scenario() -> None:
        async with running_server(addresses, flush_size=5,
                                  max_server_buffered_bytes=20 * 4096) as server:
            a = await WireClient.connect(port_of(server), "a")
            b = await WireClient.connect(port_of(server), "b")
            for r in redis6[:3]:
                r.stop()  # nothing can be stored: everything stays buffered
            for seq in range(30):
                a.send(seq, data[:-1] + bytes([seq]))
            await a.wait_for(lambda: len(a.responses(BlockStatus.RECV_OK))
                             + len(a.responses(BlockStatus.RECV_FAILED)) >= 30, "30 answers")
            assert server.budget.used == 20 * 4096
            b.send(0, data)
            await b.wait_for(lambda: bool(b.responses(BlockStatus.RECV_FAILED)), "RecvFailed")
            assert server.stats.recv_failed_server >= 11
            for r in redis6[:3]:
                r.start()
            await a.wait_flushed(range(20))
            b.send(0, data)  # the client's resend, once there is room
            b.write(ClientConnection.send_force_flush(0))
            await b.wait_flushed([0])
            await a.close()
            await b.close()

    asyncio.run(asyncio.wait_for(scenario(), 4 * WAIT))


def test_reset_and_continue_shut_out_an_earlier_run_still_in_flight(
        redis6: list[RedisProcess], tmp_path: Path) -> None:
    """A handshake with resetFirstSequence and continueSequence (a restarted tlog nbd
    recovering): a new epoch right after the last sequence taken in order; the earlier
    connection is closed, its out-of-order blocks are dropped, and what it still sends is
    not taken, so nothing of the earlier run lands after the new one's writes."""
    addresses = [r.address for r in redis6]
    old_run = session(b"old", count=6)
    new_run = session(b"new", first=4, count=5)  # indexes 0..4: index 5 stays the old's if
    # the old run's block 5 landed

    async def scenario() -> None:
        async with running_server(addresses, flush_size=100) as server:
            port = port_of(server)
            old = await WireClient.connect(port, "rc", 0)
            for b in old_run[:4]:  # 0..3 in order (pending), then 5 ahead of the gap at 4
                old.send(b.sequence, b.data, b.index, b.timestamp)
            old.send(5, old_run[5].data, 5, old_run[5].timestamp)
            await old.wait_for(lambda: len(old.responses(BlockStatus.RECV_OK)) == 5, "RecvOK")
            new = WireClient()
            new._reader, new._writer = await asyncio.open_connection("127.0.0.1", port)
            new._task = asyncio.get_running_loop().create_task(new._read())
            new.write(ClientConnection.send_handshake("rc", 0, True, continue_sequence=True))
            await new.wait_for(lambda: bool(new.events), "handshake response")
            assert new.handshake.has_log and new.handshake.last_sequence == 3
            assert new.handshake.epoch == 1  # the epoch its blocks go to
            await old.wait_closed()
            for b in new_run:
                new.send(b.sequence, b.data, b.index, b.timestamp)
            new.write(ClientConnection.send_force_flush(new_run[-1].sequence))
            await new.wait_flushed(range(4, 9))
            await new.close()

    asyncio.run(scenario())
    # The old run's 0..3 (flushed in epoch 0), then the new epoch from 4: the old block 5
    # (out of order when the new run came) is gone.
    assert restored(redis6, tmp_path, "rc") == image(old_run[:4] + new_run)
    assert "2 epochs" in tlog_cli("verify", *read_args(redis6, "rc")).stdout
