"""Standby failover never serves a disk that is not the log (docs/slave-sync.md, docs/nbd.md):
real nbdkit with the Redis block store backend, a real standby redis-server kept in step by
a real tlogserver's slave sync, six real redis-servers for the log, and `tlog restore`.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .redis_fixture import RedisFactory, RedisProcess
from .serverproc import ServerProcess, pick_port
from .test_cli_read import KEY, WAIT, read_args, start_tlogserver, tlog_cli
from .test_nbd import NbdServer, qemu_io

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nbdkit", "nbdcopy", "qemu-io")),
    reason="nbdkit, nbdcopy or qemu-io missing (make test installs them)")

MiB = 1 << 20
SIZE = 4 * MiB


def slave_synced(redis6: list[RedisProcess], tmp_path: Path, vdisks: dict[str, RedisProcess],
                 *extra: str) -> ServerProcess:
    """A tlogserver keeping each vdisk's standby in step (slave sync)."""
    config = tmp_path / "tlogserver.yaml"
    config.write_text(yaml.safe_dump({"vdisks": {
        vdisk: {"slave_sync": True, "slave_server": standby.address}
        for vdisk, standby in vdisks.items()}}))
    return start_tlogserver(redis6, KEY, "--config", str(config), "--with-slave-sync",
                            "--slave-sync-timeout", "5", *extra)


def export(server: ServerProcess, vdisk: str, primary: RedisProcess,
           standby: RedisProcess | None, *extra: str) -> list[str]:
    args = ["--vdisk", vdisk, "--server", server.address, "--backend", "redis", "--redis",
            primary.address, "--size", str(SIZE), "--failover-timeout", "20", *extra]
    if standby is not None:
        args += ["--standby", standby.address]
    return args


def device(nbd: NbdServer, tmp_path: Path) -> bytes:
    out = tmp_path / f"device-{time.monotonic_ns()}.img"
    subprocess.run(["nbdcopy", nbd.uri, str(out)], check=True, timeout=WAIT * 4)
    return out.read_bytes()


def restored(redis6: list[RedisProcess], vdisk: str, tmp_path: Path) -> bytes:
    out = tmp_path / f"restored-{time.monotonic_ns()}.img"
    tlog_cli("restore", *read_args(redis6, vdisk), "--size", str(SIZE), "--output", str(out),
             "--state-file", str(out) + ".state")
    return out.read_bytes()


def wait_in_step(server: ServerProcess, redis6: list[RedisProcess], vdisk: str,
                 standby: RedisProcess) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        proc = tlog_cli("slave-status", *read_args(redis6, vdisk), "--slave", standby.address,
                        check=False)
        if ": in step" in proc.stdout:
            return
        assert time.monotonic() < deadline, proc.stdout + proc.stderr
        time.sleep(0.2)


def restart_empty(redis: RedisProcess) -> None:
    """A redis without persistence killed and started again: it lost what it held."""
    redis.stop()
    redis.start()


def test_failover_to_a_standby_that_lost_its_data(redis6: list[RedisProcess],
                                                  redis_factory: RedisFactory,
                                                  tmp_path: Path) -> None:
    """The standby's redis restarts empty while in step: the server notices by itself (it
    looks at idle standbys), counts it, and rebuilds it from the log; a failover then
    serves the data, never the zeroes an empty standby holds."""
    from .test_operations import scrape, value

    primary, standby = redis_factory(2)
    metrics = pick_port()
    data = os.urandom(SIZE)
    source = tmp_path / "data.bin"
    source.write_bytes(data)
    with slave_synced(redis6, tmp_path, {"lost": standby},
                      "--metrics-address", f"127.0.0.1:{metrics}") as server:
        with NbdServer(tmp_path, *export(server, "lost", primary, standby)) as nbd:
            subprocess.run(["nbdcopy", str(source), nbd.uri], check=True, timeout=WAIT * 4)
            wait_in_step(server, redis6, "lost", standby)
            restart_empty(standby)
            server.wait_for_log("standby .* lost its data", timeout=WAIT)
            samples = asyncio.run(scrape(metrics))
            assert value(samples, "tlog_slave_data_lost_total", vdisk="lost") == 1
            primary.stop()  # the next request fails over
            assert device(nbd, tmp_path) == data
            nbd.wait_for("now serving from the standby")
            assert nbd.stop() == 0
        assert "Traceback" not in server.output()
    assert restored(redis6, "lost", tmp_path) == data


def test_a_restart_after_a_failover_serves_the_standby(redis6: list[RedisProcess],
                                                       redis_factory: RedisFactory,
                                                       tmp_path: Path) -> None:
    """After a failover, a restart with the same flags serves the standby (its state says
    the vdisk failed over to it), not the old primary (restarted empty here); with the
    standby down it refuses the old primary in one line, empty or holding its old data."""
    primary, standby = redis_factory(2)
    (old,) = redis_factory(1, appendonly="yes", appendfsync="always")  # keeps its data
    with slave_synced(redis6, tmp_path, {"fo2": standby, "fo3": standby}) as server:
        for vdisk, first in (("fo2", primary), ("fo3", old)):
            args = export(server, vdisk, first, standby,
                          "--redis-key-prefix", f"{vdisk}:", "--standby-key-prefix",
                          f"{vdisk}:")
            with NbdServer(tmp_path, *args) as nbd:
                qemu_io(nbd.uri, f"write -P 0x61 0 {MiB}", "flush")
                wait_in_step(server, redis6, vdisk, standby)
                first.stop()
                qemu_io(nbd.uri, f"write -P 0x62 {MiB} {MiB}", "flush")
                nbd.wait_for("now serving from the standby")
                assert nbd.stop() == 0
            first.start()  # back: empty (fo2), or as it was before the failover (fo3)
            with NbdServer(tmp_path, *args) as nbd:
                nbd.wait_for("serving the standby")
                qemu_io(nbd.uri, f"write -P 0x63 {2 * MiB} 4096", "flush")
                served = device(nbd, tmp_path)
                assert nbd.stop() == 0
            assert served[MiB:2 * MiB] == b"\x62" * MiB
            assert restored(redis6, vdisk, tmp_path) == served
            status = tlog_cli("slave-status", *read_args(redis6, vdisk), "--slave",
                              standby.address, "--slave-prefix", f"{vdisk}:").stdout
            assert "is the live disk: the vdisk failed over to it" in status, status
            refused = subprocess.run(
                [sys.executable, "-c", "from tlog.cli import main; main()", "nbd",
                 "--socket", str(tmp_path / f"{vdisk}.sock"),
                 *export(server, vdisk, first, None, "--redis-key-prefix", f"{vdisk}:")],
                capture_output=True, text=True, timeout=WAIT * 2)
            assert refused.returncode == 1, refused.stderr
            last = refused.stderr.strip().splitlines()[-1]
            assert last.startswith("Error: ") and (
                "has no tlog state, but vdisk" in last
                or "the log has writes the device does not" in last), last
            assert "Traceback" not in refused.stderr


def test_a_refused_failover_leaves_device_and_log_equal(redis6: list[RedisProcess],
                                                        redis_factory: RedisFactory,
                                                        tmp_path: Path) -> None:
    """The primary dies while the standby is down: the failover is refused, the write
    fails with EIO (in one line, no traceback), and the log did not take it; with both
    back, a restart serves the primary, and the restore equals it."""
    (primary,) = redis_factory(1, appendonly="yes", appendfsync="always")
    (standby,) = redis_factory(1)
    with slave_synced(redis6, tmp_path, {"rf": standby}) as server:
        args = export(server, "rf", primary, standby, "--failover-timeout", "3")
        with NbdServer(tmp_path, *args) as nbd:
            qemu_io(nbd.uri, f"write -P 0x41 0 {MiB}", "flush")
            standby.stop()
            primary.stop()
            failed = qemu_io(nbd.uri, f"write -P 0x55 {MiB} 65536", "flush", check=False)
            assert "error" in (failed.stdout + failed.stderr).lower(), failed
            nbd.wait_for("cannot switch to the standby")
            assert "Traceback" not in nbd.log
            assert nbd.stop() == 0
        assert b"\x55" not in restored(redis6, "rf", tmp_path)
        primary.start()
        standby.start()
        with NbdServer(tmp_path, *args) as nbd:
            served = device(nbd, tmp_path)
            assert nbd.stop() == 0
    assert served[:MiB] == b"\x41" * MiB and b"\x55" not in served
    assert restored(redis6, "rf", tmp_path) == served


def test_standby_checks_at_start(redis6: list[RedisProcess], redis_factory: RedisFactory,
                                 tmp_path: Path) -> None:
    """--standby for a vdisk the tlogserver keeps no standby of: refused at start, one line.
    The primary down at start with the standby in step: it starts on the standby."""
    primary, standby = redis_factory(2)
    with start_tlogserver(redis6, KEY) as plain:  # no slave sync at all
        proc = subprocess.run(
            [sys.executable, "-c", "from tlog.cli import main; main()", "nbd", "--socket",
             str(tmp_path / "x.sock"), *export(plain, "nosync", primary, standby)],
            capture_output=True, text=True, timeout=WAIT * 2)
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines()[-1] == (
            f"Error: --standby {standby.address}: the tlogserver keeps no standby of vdisk "
            "nosync in step (slave sync is off for it: tlogserver --with-slave-sync, and "
            "slave_sync and slave_server in its config entry), so a failover to it would fail")
    with slave_synced(redis6, tmp_path, {"down": standby}) as server:
        args = export(server, "down", primary, standby)
        with NbdServer(tmp_path, *args) as nbd:
            qemu_io(nbd.uri, f"write -P 0x71 0 {MiB}", "flush")
            wait_in_step(server, redis6, "down", standby)
            assert nbd.stop() == 0
        primary.stop()
        with NbdServer(tmp_path, *args) as nbd:
            nbd.wait_for("starting on the standby")
            assert "Traceback" not in nbd.log
            qemu_io(nbd.uri, f"write -P 0x72 {MiB} 4096", "flush")
            served = device(nbd, tmp_path)
            assert nbd.stop() == 0
    assert served[:MiB] == b"\x71" * MiB
    assert restored(redis6, "down", tmp_path) == served


class Model:
    """What FLUSHes confirmed a vdisk holds, and the ranges of writes that failed (either
    their data or what was there before may be served: they are not compared)."""

    def __init__(self, rng: random.Random, tmp_path: Path, name: str) -> None:
        self.rng, self.tmp_path, self.name = rng, tmp_path, name
        self.data = bytearray(SIZE)
        self.unsure: list[tuple[int, int]] = []
        self.steps: list[str] = []  # what happened, for the message of a failure

    def write(self, nbd: NbdServer, pattern: int) -> bool:
        offset = self.rng.randrange(0, SIZE // 4096 - 16) * 4096
        length = self.rng.choice([4096, 65536])
        done = qemu_io(nbd.uri, f"write -P {pattern} {offset} {length}", "flush",
                       check=False)
        if done.returncode == 0 and "error" not in done.stdout.lower():
            self.data[offset:offset + length] = bytes([pattern]) * length
            self.steps.append(f"write {pattern} at {offset}+{length}")
            return True
        self.unsure.append((offset, length))
        self.steps.append(f"write {pattern} at {offset}+{length} failed")
        return False

    def check(self, nbd: NbdServer) -> bytes | None:
        """The device read through NBD: what the model says (None: the read failed)."""
        out = self.tmp_path / "device.img"
        read = subprocess.run(["nbdcopy", nbd.uri, str(out)], capture_output=True,
                              timeout=WAIT * 4)
        if read.returncode != 0:
            return None  # EIO: allowed, not other data
        served = out.read_bytes()
        want, got = bytearray(self.data), bytearray(served)
        for offset, length in self.unsure:
            want[offset:offset + length] = got[offset:offset + length] = bytes(length)
        assert got == want, (f"{self.name}: the export served data no FLUSH confirmed "
                             f"after {self.steps}:\n{nbd.log}")
        return served


def in_step_by_metrics(port: int, vdisk: str) -> None:
    """Until the tlogserver's metrics say the vdisk's standby holds everything stored."""
    from .test_operations import scrape, value

    deadline = time.monotonic() + WAIT
    while True:
        samples = asyncio.run(scrape(port))
        if (value(samples, "tlog_slave_lag_blocks", vdisk=vdisk) == 0
                and value(samples, "tlog_slave_applied_sequence", vdisk=vdisk) >= 0
                and value(samples, "tlog_slave_failing", vdisk=vdisk) == 0):
            return
        assert time.monotonic() < deadline, f"the standby of {vdisk} is not in step"
        time.sleep(0.05)


@pytest.mark.timeout(600)
def test_kills_of_the_standby_the_primary_and_the_nbd_side_in_random_orders(
        redis6: list[RedisProcess], redis_factory: RedisFactory, tmp_path: Path) -> None:
    """20 rounds, each a vdisk of its own: a confirmed write, then the standby restarted
    empty, the primary killed and the NBD side killed and started again, in a random order
    and with a write and a FLUSH before each. Whatever happens, what the export serves is
    what FLUSHes confirmed (a request may fail with EIO instead, never return other
    data), and after the round's last FLUSH the restore equals the device."""
    rng = random.Random(28)
    rounds = 20
    primary, standby = redis_factory(2)
    vdisks = {f"r{i}": standby for i in range(rounds)}
    metrics = pick_port()
    started = time.monotonic()
    with slave_synced(redis6, tmp_path, vdisks,
                      "--metrics-address", f"127.0.0.1:{metrics}") as server:
        for i in range(rounds):
            vdisk = f"r{i}"
            args = export(server, vdisk, primary, standby, "--redis-key-prefix", f"{vdisk}:",
                          "--standby-key-prefix", f"{vdisk}:", "--failover-timeout", "10")
            model = Model(rng, tmp_path, vdisk)
            nbd = NbdServer(tmp_path, *args).ready()
            try:
                assert model.write(nbd, 1)
                in_step_by_metrics(metrics, vdisk)
                events = rng.sample(["standby", "primary", "nbd"], rng.randint(1, 3))
                for n, event in enumerate(events):
                    model.write(nbd, 2 + n)
                    model.steps.append(event)
                    if event == "standby":
                        restart_empty(standby)
                    elif event == "primary":
                        primary.stop()
                    else:
                        nbd.process.kill()
                        nbd.process.wait(timeout=WAIT)
                        nbd = NbdServer(tmp_path, *args)
                        try:
                            nbd.ready()
                        except AssertionError:  # refused (both disks gone): one line
                            assert "Traceback" not in nbd.log
                            break
                    model.check(nbd)
                else:
                    if model.write(nbd, 9):
                        served = model.check(nbd)
                        if served is not None:
                            assert restored(redis6, vdisk, tmp_path) == served, vdisk
            finally:
                if nbd.process.poll() is None:
                    nbd.process.kill()
                    nbd.process.wait(timeout=WAIT)
                if not primary.running:
                    primary.start()
                if not standby.running:
                    standby.start()
            assert "Traceback" not in nbd.log
            print(f"round {i}: {model.steps} ({time.monotonic() - started:.1f} s)")
