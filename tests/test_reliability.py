"""Storage faults, forks and graceful drain, on real redis-servers and real tlogservers.

- k+m servers with some down: degraded flushes (acknowledged once ``min_pieces`` servers
  stored them), the missing pieces recorded and rebuilt by ``tlog repair``; a hung server
  neither stalls flushes nor piles up requests; more than m down: FlushFailed, then every
  block stored once storage is back.
- Two tlogservers on one vdisk (a client that failed over while the first one retried):
  the first one gives up instead of forking the chain.
- SIGTERM: several vdisks and a client in mid-stream drained within a bound; storage down
  during the drain: exit 1 within --drain-timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import pytest

import tlogserver.flusher as flusher_mod
from tlog.client import TlogClient
from tlog.protocol import ClientConnection
from tlog.protocol.status import BlockStatus, Operation
from tlog.read.verify import VerifyReport, verify_chain
from tlog.record.aggregation import Keyring, RecordOpener
from tlog.storage import any_pool_factory
from tlog.storage.keys import MARKER_PREFIX, parse_marker_value

from .redis_fixture import RedisFactory, RedisProcess
from .serverproc import ServerProcess, config_free_env, storage_args, stored_sequences
from .test_compiled import PATCHES_COMPILED
from .wireclient import KEY, WireClient, port_of, read_chain, running_server

T = TypeVar("T")
WAIT = 30.0  # bound on every wait


def run(coro: Coroutine[Any, Any, T], timeout: float = 90.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro
    return asyncio.run(bounded())


def data(seq: int) -> bytes:
    return hashlib.sha256(seq.to_bytes(8, "little")).digest() * 128  # 4 KiB, distinct


def send(client: WireClient, sequences: range) -> None:
    for seq in sequences:
        client.send(seq, data(seq))
    client.write(ClientConnection.send_force_flush(sequences[-1]))


def tlog(*args: str) -> subprocess.CompletedProcess[str]:
    env = config_free_env()
    return subprocess.run([sys.executable, "-c", "from tlog.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120, env=env)


def read_args(addresses: Sequence[str], vdisk: str = "vd") -> list[str]:
    return ["--vdisk", vdisk, "--storage-addresses", ",".join(addresses), "--priv-key", KEY]


def markers(server: RedisProcess, vdisk: str = "vd") -> dict[bytes, list[int]]:
    """The missing-piece markers on one server: aggregation hash -> servers named."""
    client = server.client()
    prefix = MARKER_PREFIX + vdisk.encode() + b":"
    try:
        found = {}
        for name in client.scan_iter(match=prefix + b"*"):
            value = client.get(name)
            found[bytes.fromhex(name[len(prefix):].decode())] = parse_marker_value(value or b"")
        return found
    finally:
        client.close()


def verify(addresses: Sequence[str], vdisk: str = "vd") -> VerifyReport:
    async def go() -> VerifyReport:
        factory = any_pool_factory(k=4, m=2, addresses=",".join(addresses), allow_memory=False)
        try:
            opener = RecordOpener(Keyring.of(KEY.encode()), None, "v2")
            return await verify_chain(factory.pool_for(vdisk), vdisk, opener)
        finally:
            await factory.close()
    return run(go())


# ---------------------------------------------------------------------------------------------
# Degraded writes and repair


def test_one_server_down_flushes_degraded_and_repair_rebuilds_its_pieces(
        redis6: list[RedisProcess]) -> None:
    addresses = [r.address for r in redis6]
    down = redis6[1]

    async def scenario() -> None:
        async with running_server(addresses) as server:
            client = await WireClient.connect(port_of(server))
            send(client, range(0, 25))
            await client.wait_flushed(range(0, 25))
            down.stop()
            send(client, range(25, 100))  # three aggregations without server 1
            await client.wait_flushed(range(25, 100))
            assert not client.responses(BlockStatus.FLUSH_FAILED)
            down.start()  # back, and empty: it kept nothing (no persistence)
            send(client, range(100, 125))
            await client.wait_flushed(range(100, 125))
            await client.close()

    run(scenario())
    chain = [agg.hash for agg in read_chain(addresses, "vd")]
    assert len(chain) == 5
    for up in redis6[:1] + redis6[2:]:
        recorded = markers(up)
        assert set(chain[1:4]) <= set(recorded)  # recorded with the pieces
        assert all(servers == [1] for servers in recorded.values())
    assert not markers(down)
    client = down.client()
    assert [client.exists(key) for key in chain] == [0, 0, 0, 0, 1]
    before = verify(addresses)
    assert before.sound and len([p for p in before.warnings if "missing on server 1" in
                                 p.message]) == 4

    # Recorded pieces only: the three degraded aggregations, and their markers go.
    proc = tlog("repair", *read_args(addresses), "--no-scan")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rewrote 3 pieces" in proc.stdout
    assert [client.exists(key) for key in chain] == [0, 1, 1, 1, 1]
    assert not any(markers(r) for r in redis6)
    # The scan finds the piece the restart lost without a record.
    proc = tlog("repair", *read_args(addresses))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rewrote 1 pieces" in proc.stdout and "1 of them found by the scan" in proc.stdout
    assert [client.exists(key) for key in chain] == [1, 1, 1, 1, 1]
    client.close()
    after = verify(addresses)
    assert after.sound and not after.problems
    proc = tlog("repair", *read_args(addresses))  # nothing left to do
    assert proc.returncode == 0 and "rewrote 0 pieces" in proc.stdout


def test_repair_reports_what_it_cannot_rebuild(redis6: list[RedisProcess]) -> None:
    addresses = [r.address for r in redis6]

    async def scenario() -> None:
        async with running_server(addresses) as server:
            client = await WireClient.connect(port_of(server))
            send(client, range(0, 25))
            await client.wait_flushed(range(0, 25))
            await client.close()

    run(scenario())
    (only,) = read_chain(addresses, "vd")
    redis6[5].stop()
    proc = tlog("repair", *read_args(addresses), "--dry-run")
    assert proc.returncode == 1  # server 5 down: its piece cannot be put back
    assert "unreachable: " + redis6[5].address in proc.stdout
    redis6[5].start()
    proc = tlog("repair", *read_args(addresses), "--dry-run")
    assert proc.returncode == 0 and "would rewrite 1 pieces" in proc.stdout
    assert not redis6[5].client().exists(only.hash)  # a dry run writes nothing


def test_min_pieces_k_goes_on_with_m_servers_down(redis6: list[RedisProcess]) -> None:
    addresses = [r.address for r in redis6]

    async def scenario() -> None:
        async with running_server(addresses, min_pieces=4) as server:
            client = await WireClient.connect(port_of(server))
            send(client, range(0, 25))
            await client.wait_flushed(range(0, 25))
            redis6[0].stop()
            redis6[5].stop()
            send(client, range(25, 50))
            await client.wait_flushed(range(25, 50))
            assert not client.responses(BlockStatus.FLUSH_FAILED)
            assert server.vdisks["vd"].flusher.min_pieces == 4
            await client.close()

    run(scenario())
    live = [r.address for r in redis6[1:5]]
    assert run(stored_sequences(addresses[:1] + live + addresses[5:], "vd")) == list(range(50))


def test_a_hung_storage_server_neither_stalls_flushes_nor_piles_up_requests(
        redis6: list[RedisProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flusher_mod, "STRAGGLER_WAIT", 0.3)
    addresses = [r.address for r in redis6]
    hung = redis6[3]
    assert hung.process is not None

    async def scenario() -> None:
        async with running_server(addresses, flush_size=25) as server:
            client = await WireClient.connect(port_of(server))
            send(client, range(0, 25))
            await client.wait_flushed(range(0, 25))
            flusher = server.vdisks["vd"].flusher
            assert hung.process is not None
            os.kill(hung.process.pid, signal.SIGSTOP)  # no answer, no error: a hang
            try:
                started = time.monotonic()
                for first in range(25, 525, 25):
                    send(client, range(first, first + 25))
                    await client.wait_flushed(range(first, first + 25))
                    # at most one request of an earlier round waits on the hung server
                    assert len(flusher._outstanding) <= 1
                elapsed = time.monotonic() - started
            finally:
                os.kill(hung.process.pid, signal.SIGCONT)
            print(f"20 flushes with a hung storage server: {elapsed:.2f} s")
            # 20 flushes; without the straggler rule each would wait for the 10 s timeout
            assert elapsed < 8.0, f"20 flushes took {elapsed:.1f} s with a hung server"
            assert 3 in flusher.missing_servers
            await client.close()

    run(scenario())
    assert run(stored_sequences(addresses, "vd")) == list(range(525))
    proc = tlog("repair", *read_args(addresses))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert verify(addresses).problems == []


def test_a_vdisk_given_up_during_a_storage_round_keeps_the_byte_budget_right(
        redis6: list[RedisProcess]) -> None:
    """Ownership lost while a round is in flight: the vdisk releases its pending bytes at
    once, the queued batches are dropped, and the round's own callback, should it still
    come (the round completing before the flusher is stopped), releases nothing again
    (the server's buffered bytes went negative) and answers nobody."""
    addresses = [r.address for r in redis6]

    async def scenario() -> None:
        async with running_server(addresses, flush_size=10) as server:
            client = await WireClient.connect(port_of(server), "given-up")
            vdisk = server.vdisks["given-up"]
            for r in redis6:
                assert r.process is not None
                os.kill(r.process.pid, signal.SIGSTOP)
            try:
                send(client, range(0, 10))  # one aggregation: its round hangs
                await client.wait_for(lambda: len(client.responses(BlockStatus.RECV_OK))
                                      == 10, "RecvOK of 10")
                deadline = time.monotonic() + WAIT
                while not vdisk.flusher._inflight:
                    assert time.monotonic() < deadline, "no round started"
                    await asyncio.sleep(0.01)
                for seq in range(10, 25):  # more blocks, queued behind the round
                    client.send(seq, data(seq))
                client.write(ClientConnection.send_force_flush(24))
                await client.wait_for(lambda: len(client.responses(BlockStatus.RECV_OK))
                                      == 25, "RecvOK of 25")
                assert server.budget.used == 25 * 4096
                in_flight = list(vdisk.flusher._inflight)
                server.ownership_lost("the ownership lease was lost (test)")
                assert server.budget.used == 0 and vdisk.pending_bytes == 0
                assert vdisk.flusher.queued_blocks == 0
                vdisk.on_stored(in_flight)  # the round landing before the flusher stops
                assert (server.budget.used, vdisk.pending_bytes) == (0, 0)
            finally:
                for r in redis6:
                    assert r.process is not None
                    os.kill(r.process.pid, signal.SIGCONT)
            deadline = time.monotonic() + WAIT
            while vdisk.flusher._task is not None:  # stopped by the server once retired
                assert time.monotonic() < deadline, "the flusher was not stopped"
                await asyncio.sleep(0.01)
            await client.wait_closed()
            assert (server.budget.used, vdisk.pending_bytes) == (0, 0)
            assert client.flushed() == []

    run(scenario())
    # the round in flight may have landed (it cannot be called back); nothing after it did
    assert run(stored_sequences(addresses, "given-up")) in ([], list(range(10)))


def test_more_than_m_down_fails_flushes_and_everything_is_stored_once_back(
        redis_factory: RedisFactory) -> None:
    redis = redis_factory(6, appendonly="yes")  # the three stopped keep their data
    addresses = [r.address for r in redis]
    n, outage_at = 3000, 1000
    server = ServerProcess(*storage_args(addresses)).start()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        failed = asyncio.Event()

        def on_response(status: int, sequences: Sequence[int]) -> None:
            if status == BlockStatus.FLUSH_FAILED:
                failed.set()

        client = await TlogClient.open([server.address], "outage", reconnect_max_delay=0.25,
                                       max_unflushed_bytes=1024 * 1024,
                                       on_response=on_response)
        for seq in range(outage_at):
            await client.send(Operation.SET, seq, seq % 700, None, data(seq))
        await client.wait_flushed(timeout=WAIT)
        for r in redis[:3]:
            r.stop()

        async def rest() -> None:
            for seq in range(outage_at, n):
                await client.send(Operation.SET, seq, seq % 700, None, data(seq))

        sender = loop.create_task(rest())
        await asyncio.wait_for(failed.wait(), WAIT)
        assert client.stats().unflushed_blocks > 0
        for r in redis[:3]:
            await loop.run_in_executor(None, r.start)
        await asyncio.wait_for(sender, WAIT)
        await client.wait_flushed(timeout=WAIT)
        assert client.stats().flushed_blocks == n
        await client.close()

    try:
        run(scenario())
    finally:
        server.kill()
    stored = run(stored_sequences(addresses, "outage"))
    assert set(stored) == set(range(n))
    report = verify(addresses, "outage")
    assert report.sound, report.errors


# ---------------------------------------------------------------------------------------------
# Two servers, one vdisk: no fork


# The last two cases take a safety check out by patching the flusher's methods, which only
# works on the pure-Python path (a compiled class calls its methods natively): they run in
# make test's TLOG_NO_EXTENSIONS=1 pass.
@pytest.mark.parametrize("case", ["client-left", "foreign-head",
                                  pytest.param("compare-and-set", marks=PATCHES_COMPILED),
                                  pytest.param("unprotected", marks=PATCHES_COMPILED)])
def test_a_server_still_retrying_when_its_client_failed_over_does_not_fork_the_chain(
        redis6: list[RedisProcess], monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """Server A fails to flush 25..49 (two of six servers down, k+1 needed); its client
    fails over to server B, which stores them and 50..74 once storage is back. A must not
    store its copy on top of the chain afterwards: with no client left it gives up at its
    next retry ("client-left"); with a client still connected, it sees B's records on top
    of its own and gives up ("foreign-head"). Without that check, the compare-and-set of the
    head alone refuses A's round (the heads are B's now) and A gives up all the same
    ("compare-and-set"). Without both, A's copy becomes the head of every last-hash list and
    B's acknowledged 50..74 drop out of the chain ("unprotected")."""
    monkeypatch.setattr(flusher_mod, "RETRY_MIN", 60.0)  # A retries when we say so
    if case in ("compare-and-set", "unprotected"):
        async def no_fork_seen(self: flusher_mod.Flusher) -> None:
            return None
        monkeypatch.setattr(flusher_mod.Flusher, "_foreign_head", no_fork_seen)
    if case == "unprotected":
        async def plain_store(self: flusher_mod.Flusher, index: int, server: Any,
                              items: list[tuple[bytes, bytes]], hashes: list[bytes]) -> None:
            await server.store(items, self._list_key, hashes)
        monkeypatch.setattr(flusher_mod.Flusher, "_store_on", plain_store)
    addresses = [r.address for r in redis6]

    async def scenario() -> None:
        async with running_server(addresses) as a, running_server(addresses) as b:
            first = await WireClient.connect(port_of(a))
            send(first, range(0, 25))
            await first.wait_flushed(range(0, 25))
            bystander = (await WireClient.connect(port_of(a)) if case != "client-left"
                         else None)
            redis6[0].stop()
            redis6[1].stop()
            send(first, range(25, 50))
            await first.wait_for(lambda: bool(first.responses(BlockStatus.FLUSH_FAILED)),
                                 "FlushFailed")
            vdisk_a = a.vdisks["vd"]
            await first.close()  # the client fails over
            redis6[0].start()
            redis6[1].start()
            second = await WireClient.connect(port_of(b), first=25)
            send(second, range(25, 75))
            await second.wait_flushed(range(25, 75))
            await second.close()
            vdisk_a.flusher.retry_now()
            if case == "unprotected":
                await vdisk_a.flusher.wait_idle()  # A stored its copy: the fork
                assert vdisk_a.abandoned is None
            else:
                await asyncio.wait_for(vdisk_a.flusher.wait_stopped(), WAIT)
                assert vdisk_a.abandoned is not None and vdisk_a.retired
                assert "vd" not in a.vdisks
                assert not first.flushed()[25:]  # A never acknowledged its copy
            if bystander is not None:
                if case == "foreign-head":
                    await bystander.wait_closed()
                await bystander.close()

    run(scenario())
    report = verify(addresses)
    stored = set(run(stored_sequences(addresses, "vd")))
    if case == "unprotected":
        assert any("forked" in p.message for p in report.errors), report.problems
        assert stored == set(range(50))  # 50..74 were acknowledged by B, and are lost
        return
    assert report.sound, report.errors
    # A's failed attempt may be readable (4 of 6 pieces landed) and B continues after it:
    # then 25..49 are stored twice, which readers apply once.
    assert stored == set(range(75))


# ---------------------------------------------------------------------------------------------
# Graceful drain


def test_sigterm_drains_several_vdisks_and_a_streaming_client_in_bounded_time(
        redis6: list[RedisProcess]) -> None:
    addresses = [r.address for r in redis6]
    server = ServerProcess(*storage_args(addresses), "--flush-time", "300").start()
    vdisks = [f"pending{i}" for i in range(5)]
    flushed: set[int] = set()

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        progress = asyncio.Event()
        quiet = []
        for vdisk in vdisks:  # fewer blocks than flush-size: only the drain stores them
            client = await WireClient.connect(server.port, vdisk=vdisk)
            for seq in range(10):
                client.send(seq, data(seq))
            quiet.append(client)
        for client in quiet:
            await client.wait_for(lambda c=client: len(c.responses(BlockStatus.RECV_OK)) == 10,
                                  "RecvOK x10")

        def on_response(status: int, sequences: Sequence[int]) -> None:
            if status == BlockStatus.FLUSH_OK:
                flushed.update(sequences)
                progress.set()

        streamer = await TlogClient.open([server.address], "stream", on_response=on_response,
                                         max_unflushed_bytes=1024 * 1024)

        async def stream() -> None:
            seq = 0
            while True:
                await streamer.send(Operation.SET, seq, seq % 1000, None, data(seq))
                seq += 1

        sending = loop.create_task(stream())
        while len(flushed) < 500:  # in mid-stream
            progress.clear()
            await asyncio.wait_for(progress.wait(), WAIT)
        started = time.monotonic()
        assert server.pid is not None
        os.kill(server.pid, signal.SIGTERM)
        for client in quiet:
            await client.wait_flushed(range(10))
            await client.wait_closed()
        assert server.process is not None
        code = await loop.run_in_executor(None, server.process.wait, WAIT)
        elapsed = time.monotonic() - started
        assert code == 0, server.output()
        sending.cancel()
        await streamer.close()
        return elapsed

    try:
        elapsed = run(scenario())
    finally:
        server.kill()
    print(f"drain of 6 vdisks (one streaming): exit 0 after {elapsed:.2f} s")
    assert elapsed < 5.0, f"drain took {elapsed:.1f} s"
    assert "draining 6 vdisk(s)" in server.output()
    for vdisk in vdisks:
        assert run(stored_sequences(addresses, vdisk)) == list(range(10))
    stored = run(stored_sequences(addresses, "stream"))
    assert flushed <= set(stored) and len(flushed) >= 500


def test_sigterm_with_storage_down_exits_1_within_the_drain_timeout(
        redis6: list[RedisProcess]) -> None:
    addresses = [r.address for r in redis6]
    server = ServerProcess(*storage_args(addresses), "--flush-time", "300",
                           "--drain-timeout", "1").start()

    async def scenario() -> tuple[int, float, WireClient]:
        client = await WireClient.connect(server.port)
        for seq in range(10):
            client.send(seq, data(seq))
        await client.wait_for(lambda: len(client.responses(BlockStatus.RECV_OK)) == 10,
                              "RecvOK x10")
        for r in redis6[:3]:
            r.stop()
        started = time.monotonic()
        assert server.pid is not None and server.process is not None
        os.kill(server.pid, signal.SIGTERM)
        await client.wait_closed()
        code = await asyncio.get_running_loop().run_in_executor(None, server.process.wait,
                                                                WAIT)
        return code, time.monotonic() - started, client

    try:
        code, elapsed, client = run(scenario())
    finally:
        server.kill()
    print(f"drain with storage down: exit {code} after {elapsed:.2f} s (--drain-timeout 1)")
    assert code == 1
    assert 1.0 <= elapsed < 4.0, f"exit after {elapsed:.1f} s with --drain-timeout 1"
    assert client.responses(BlockStatus.FLUSH_FAILED) and not client.flushed()
    out = server.output()
    assert "drain timed out after 1s" in out and "drain incomplete" in out


def test_repair_logs_in_to_password_protected_storage(redis_factory: RedisFactory) -> None:
    servers = redis_factory(6, requirepass="s3cret")
    addresses = [f"redis://:s3cret@{r.address}" for r in servers]

    async def scenario() -> None:
        async with running_server(addresses) as server:
            client = await WireClient.connect(port_of(server))
            servers[3].stop()
            send(client, range(0, 25))  # degraded: server 3's piece is recorded missing
            await client.wait_flushed(range(0, 25))
            servers[3].start()
            await client.close()

    run(scenario())
    assert markers(servers[0])
    proc = tlog("repair", *read_args(addresses), "--no-scan")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rewrote 1 pieces" in proc.stdout
    assert not any(markers(r) for r in servers)
