"""Slave sync against real processes: a tlogserver subprocess logging into six redis-servers
and replaying every stored aggregation into a standby redis-server; compared block for block
with `tlog restore` of the log (a real `tlog` subprocess)."""

from __future__ import annotations

import asyncio
import json
import random
import struct
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from tlog.client import SlaveSyncError, ThreadedClient
from tlog.protocol import ClientConnection, Operation
from tlog.protocol.status import BlockStatus
from tlog.protocol.wire import Block
from tlog.read.standby import StandbyError, StandbyStore, StandbyTarget, SyncPosition
from tlog.storage import ServerAddress

from .redis_fixture import RedisFactory, RedisProcess
from .serverproc import ServerProcess, pick_port, storage_args
from .test_cli_read import KEY, read_args, tlog_cli
from .wireclient import WireClient

BLOCK = 4096
#: Writes go to a hot set of blocks (later writes overwrite earlier ones: order matters) or
#: anywhere (mostly the last write of their block: a lost one shows).
INDEXES = 16384
HOT = 256
SIZE = INDEXES * BLOCK
WAIT = 60.0


def config_file(tmp_path: Path, vdisk: str, standby: RedisProcess, **extra: object) -> Path:
    entry: dict[str, object] = {"slave_sync": True, "slave_server": standby.address, **extra}
    path = tmp_path / "tlogserver.yaml"
    path.write_text(yaml.safe_dump({"vdisks": {vdisk: entry}}))
    return path


def start_server(redis6: list[RedisProcess], config: Path, *extra: str,
                 metrics_port: int | None = None) -> ServerProcess:
    args = [*storage_args([r.address for r in redis6], priv_key=KEY), "--config", str(config),
            "--with-slave-sync", "--flush-size", "25", "--flush-time", "600", *extra]
    if metrics_port is not None:
        args += ["--metrics-address", f"127.0.0.1:{metrics_port}"]
    return ServerProcess(*args).start()


def write(client: ThreadedClient, rng: random.Random, count: int) -> None:
    """``count`` random writes over `INDEXES` blocks, one in ten a delete."""
    for _ in range(count):
        index = rng.randrange(HOT) if rng.random() < 0.3 else rng.randrange(INDEXES)
        if rng.random() < 0.1:
            client.send_next(Operation.DELETE, index, None, b"")
        else:
            data = struct.pack("<QQ", index, rng.getrandbits(64)) * (BLOCK // 16)
            client.send_next(Operation.SET, index, None, data)


def standby_image(standby: RedisProcess, prefix: str) -> bytes:
    """The standby's blocks as an image of `SIZE` bytes (no key: zeroes)."""
    r = standby.client()
    keys = [f"{prefix}{i}".encode() for i in range(INDEXES)]
    values = r.mget(keys)
    stray = [k for k in r.scan_iter(match=f"{prefix}*".encode())
             if k[len(prefix):].isdigit() and int(k[len(prefix):]) >= INDEXES]
    assert not stray, f"blocks outside the vdisk: {stray[:5]}"
    return b"".join(bytes(BLOCK) if v is None else v for v in values)


def restored_image(redis6: list[RedisProcess], vdisk: str, tmp_path: Path) -> bytes:
    out = tmp_path / f"restore-{time.monotonic_ns()}.img"
    tlog_cli("restore", *read_args(redis6, vdisk), "-o", str(out), "--size", str(SIZE))
    return out.read_bytes()


def assert_same(standby: bytes, restored: bytes) -> None:
    assert len(standby) == len(restored)
    bad = [i for i in range(INDEXES)
           if standby[i * BLOCK:(i + 1) * BLOCK] != restored[i * BLOCK:(i + 1) * BLOCK]]
    assert not bad, f"{len(bad)} block(s) differ from the restore, first {bad[:10]}"


def position(standby: RedisProcess, prefix: str) -> dict[str, object]:
    raw = standby.client().get(f"{prefix}tlog:slave-sync".encode())
    assert raw is not None
    result: dict[str, object] = json.loads(raw)
    return result


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def metric(text: str, name: str, vdisk: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'{name}{{vdisk="{vdisk}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"{name} for {vdisk} not in /metrics")


def test_standby_equals_the_restore_after_wait_nbd_slave_sync(
        redis6: list[RedisProcess], redis_factory: RedisFactory, tmp_path: Path) -> None:
    vdisk, prefix = "vd-sync", "vd-sync:"
    (standby,) = redis_factory(1)
    port = pick_port()
    server = start_server(redis6, config_file(tmp_path, vdisk, standby), metrics_port=port)
    rng = random.Random(1401)
    try:
        with ThreadedClient([server.address], vdisk, None) as client:
            write(client, rng, 20_000)
            client.wait_flushed(timeout=WAIT)
            lag_seen = metric(metrics(port), "tlog_slave_lag_blocks", vdisk)
            client.wait_nbd_slave_sync(timeout=WAIT)
            text = metrics(port)
            assert metric(text, "tlog_slave_lag_blocks", vdisk) == 0
            assert metric(text, "tlog_slave_applied_sequence", vdisk) == 19_999
            assert metric(text, "tlog_slave_ended", vdisk) == 1
            assert lag_seen >= 0
            synced = standby_image(standby, prefix)
            assert_same(synced, restored_image(redis6, vdisk, tmp_path))
            assert position(standby, prefix)["ended"] == "WaitNbdSlaveSync"
            server.wait_for_log("slave sync ended")

            # Ended: the NBD server writes the standby itself now; sync leaves it alone, and
            # a second WaitNbdSlaveSync is answered at once.
            write(client, rng, 500)
            client.wait_flushed(timeout=WAIT)
            client.wait_nbd_slave_sync(timeout=WAIT)
            assert standby_image(standby, prefix) == synced
    finally:
        server.kill()
    status = tlog_cli("slave-status", *read_args(redis6, vdisk), "--slave", standby.address,
                      "--json")
    info = json.loads(status.stdout)
    assert info["ended"] == "WaitNbdSlaveSync" and info["applied"]["sequence"] == 19_999
    assert info["log"]["last_sequence"] == 20_499 and info["behind_sequences"] == 500
    text = tlog_cli("slave-status", *read_args(redis6, vdisk), "--slave", standby.address)
    assert "behind by 500 sequence(s); slave sync ended (WaitNbdSlaveSync)" in text.stdout
    tlog_cli("slave-status", *read_args(redis6, vdisk), "--slave", standby.address, "--reset")
    assert standby.client().dbsize() == 0
    text = tlog_cli("slave-status", *read_args(redis6, vdisk), "--slave", standby.address)
    assert "never synced" in text.stdout


def test_standby_down_for_ten_seconds_catches_up_without_delaying_flushes(
        redis6: list[RedisProcess], redis_factory: RedisFactory, tmp_path: Path) -> None:
    vdisk, prefix = "vd-down", "vd-down:"
    (standby,) = redis_factory(1, appendonly="yes", appendfsync="always")
    # A small queue: what is stored during the outage is read back from the log.
    server = start_server(redis6, config_file(tmp_path, vdisk, standby),
                          "--slave-sync-queue-bytes", str(1 << 20))
    rng = random.Random(1402)
    try:
        with ThreadedClient([server.address], vdisk, None) as client:
            write(client, rng, 3000)
            client.wait_flushed(timeout=WAIT)
            standby.stop()  # SIGKILL
            down_at = time.monotonic()
            write(client, rng, 5000)
            # Every block flushed while the standby is still down: sync never holds up a
            # FlushOK.
            client.wait_flushed(timeout=WAIT)
            assert not standby.running
            server.wait_for_log("behind", timeout=WAIT)
            time.sleep(max(0.0, 10.0 - (time.monotonic() - down_at)))  # the outage itself
            standby.start()
            write(client, rng, 2000)
            client.wait_flushed(timeout=WAIT)
            client.wait_nbd_slave_sync(timeout=WAIT)
        assert_same(standby_image(standby, prefix), restored_image(redis6, vdisk, tmp_path))
        log = server.output()
        assert "caught up" in log and "reachable again" in log
        assert "rebuilt from the whole log (its position" not in log
    finally:
        server.kill()


def test_tlogserver_killed_mid_sync_resumes_from_the_recorded_position(
        redis6: list[RedisProcess], redis_factory: RedisFactory, tmp_path: Path) -> None:
    vdisk, prefix = "vd-crash", "vd-crash:"
    (standby,) = redis_factory(1)
    server = start_server(redis6, config_file(tmp_path, vdisk, standby))
    rng = random.Random(1403)
    try:
        with ThreadedClient([server.address], vdisk, None, reconnect_delay=0.05) as client:
            write(client, rng, 6000)
            client.wait_flushed(timeout=WAIT)
            write(client, rng, 3000)  # some of these are in flight when it dies
            server.kill()
            before = position(standby, prefix)
            assert int(str(before["sequence"])) >= 0
            server.start()
            write(client, rng, 3000)
            client.wait_flushed(timeout=WAIT)
            client.wait_nbd_slave_sync(timeout=WAIT)
        # The restarted server went on from the position the first one recorded.
        server.wait_for_log(rf"slave sync: standby redis {standby.address} .* at aggregation")
        assert "rebuilt from the whole log" not in server.output(current_run=True)
        after = position(standby, prefix)
        assert int(str(after["sequence"])) == 11_999
        assert_same(standby_image(standby, prefix), restored_image(redis6, vdisk, tmp_path))
    finally:
        server.kill()


def test_wait_nbd_slave_sync_fails_while_the_standby_is_unreachable(
        redis6: list[RedisProcess], redis_factory: RedisFactory, tmp_path: Path) -> None:
    vdisk, prefix = "vd-unreachable", "vd-unreachable:"
    (standby,) = redis_factory(1)
    server = start_server(redis6, config_file(tmp_path, vdisk, standby),
                          "--slave-sync-timeout", "2")
    rng = random.Random(1404)
    try:
        with ThreadedClient([server.address], vdisk, None) as client:
            write(client, rng, 500)
            client.wait_flushed(timeout=WAIT)
            standby.stop()
            write(client, rng, 500)
            client.wait_flushed(timeout=WAIT)
            started = time.monotonic()
            with pytest.raises(SlaveSyncError):
                client.wait_nbd_slave_sync(timeout=WAIT)
            assert time.monotonic() - started < WAIT  # the server's timeout, not ours
            server.wait_for_log("WaitNbdSlaveSync failed: the standby was not in step")
            # A failed wait does not end sync: once the standby is back, it catches up.
            standby.start()
            client.wait_nbd_slave_sync(timeout=WAIT)
        assert_same(standby_image(standby, prefix), restored_image(redis6, vdisk, tmp_path))
    finally:
        server.kill()


def test_a_flood_of_wait_nbd_slave_sync_costs_one_wait_per_round(
        redis6: list[RedisProcess], redis_factory: RedisFactory, tmp_path: Path) -> None:
    """Every request is answered, but a flood is served by a few rounds, not a task each."""
    vdisk = "vd-flood"
    (standby,) = redis_factory(1)
    server = start_server(redis6, config_file(tmp_path, vdisk, standby))

    async def scenario() -> None:
        client = await WireClient.connect(server.port, vdisk=vdisk)
        for seq in range(100):
            client.send(seq, struct.pack("<Q", seq) * (BLOCK // 8))
        client.write(ClientConnection.send_wait_nbd_slave_sync() * 20_000)
        await client.wait_for(lambda: len(client.responses(
            BlockStatus.WAIT_NBD_SLAVE_SYNC_RECEIVED)) == 20_000, "20,000 answers", WAIT)
        assert not client.responses(BlockStatus.WAIT_NBD_SLAVE_SYNC_FAILED)
        assert sorted(client.flushed()) == list(range(100))
        await client.close()

    try:
        asyncio.run(scenario())
        rounds = server.output(current_run=True).count("WaitNbdSlaveSync: waiting")
        assert 1 <= rounds < 100, rounds
    finally:
        server.kill()


def test_slave_sync_config_errors_are_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"vdisks": {"vd": {"slave_sync": True}}}))
    proc = subprocess.run([sys.executable, "-m", "tlogserver", "--config", str(path),
                           "--with-slave-sync", "--address", "127.0.0.1:0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "vdisks.vd.slave_server: missing" in proc.stderr
    path.write_text(yaml.safe_dump({"vdisks": {"vd": {"slave_sync": "yes",
                                                      "slave_server": "127.0.0.1:1"}}}))
    proc = subprocess.run([sys.executable, "-m", "tlogserver", "--config", str(path),
                           "--with-slave-sync", "--address", "127.0.0.1:0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "vdisks.vd.slave_sync: expected true or false" in proc.stderr


def test_two_writers_of_one_standby_cannot_undo_each_other(
        redis_factory: RedisFactory) -> None:
    """Two syncers (two tlogservers of a fleet) on one standby: a write made from a stale
    view of its position is refused, not applied over the other's."""
    (standby,) = redis_factory(1)
    target = StandbyTarget(ServerAddress.parse(standby.address), "vd:")
    block = Block(0, 7, 1, Operation.SET, b"", b"new" * 10)
    stale = Block(0, 7, 1, Operation.SET, b"", b"old" * 10)

    async def scenario() -> None:
        first, second = StandbyStore(target, BLOCK), StandbyStore(target, BLOCK)
        assert await first.position() is None and await second.position() is None
        ahead = SyncPosition(hash=b"\x01" * 32, sequence=0, vdisk="vd")
        await first.apply([block], ahead)
        with pytest.raises(StandbyError, match="moved"):
            await second.apply([stale], SyncPosition(hash=b"\x02" * 32, sequence=0))
        assert await second.position() == ahead  # read again: it goes on from there
        await second.apply([], replace(ahead, hash=b"\x03" * 32))
        await first.close()
        await second.close()

    asyncio.run(scenario())
    assert standby.client().get(b"vd:7") == b"new" * 10 + bytes(BLOCK - 30)


def test_a_standby_whose_position_was_compacted_away_is_rebuilt_from_the_checkpoint(
        redis6: list[RedisProcess], redis_factory: RedisFactory, tmp_path: Path) -> None:
    vdisk, prefix = "vd-compacted", "vd-compacted:"
    (standby,) = redis_factory(1, appendonly="yes", appendfsync="always")
    server = start_server(redis6, config_file(tmp_path, vdisk, standby),
                          "--slave-sync-queue-bytes", str(1 << 20))
    rng = random.Random(1407)
    try:
        with ThreadedClient([server.address], vdisk, None) as client:
            write(client, rng, 3000)
            client.wait_flushed(timeout=WAIT)
            deadline = time.monotonic() + WAIT  # the standby holds them all (bounded)
            while standby.client().get(f"{prefix}tlog:slave-sync".encode()) is None or int(
                    str(position(standby, prefix)["sequence"])) < 2999:
                assert time.monotonic() < deadline, "the standby never caught up"
                time.sleep(0.05)
            standby.stop()  # SIGKILL: its position stays at sequence 2999
            write(client, rng, 5000)
            client.wait_flushed(timeout=WAIT)
            done = tlog_cli("compact", *read_args(redis6, vdisk), "--keep-sequences", "500")
            assert "compacted vdisk" in done.stdout
            standby.start()
            write(client, rng, 500)
            client.wait_flushed(timeout=WAIT)
            client.wait_nbd_slave_sync(timeout=WAIT)
        assert_same(standby_image(standby, prefix), restored_image(redis6, vdisk, tmp_path))
        assert "its position was compacted away" in server.output(), server.output()
    finally:
        server.kill()
