"""After a crash of the NBD side, the served vdisk and its log agree again (docs/nbd.md,
"After a crash"): real nbdkit killed with SIGKILL in the middle of real NBD clients' writes
(qemu-io, nbdcopy, fio), a real tlogserver (paused or not) on six real redis-servers, and
`tlog restore` compared with the served device byte for byte after each restart.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .redis_fixture import RedisFactory, RedisProcess
from .serverproc import ServerProcess
from .test_cli_read import KEY, WAIT, read_args, start_tlogserver, tlog_cli
from .test_nbd import NbdServer, nbd_args, qemu_io

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nbdkit", "nbdcopy", "qemu-io", "fio")),
    reason="nbdkit, nbdcopy, qemu-io or fio missing (make test installs them)")

MiB = 1 << 20
SIZE = 8 * MiB
#: The workloads write the first half; each round's confirmed (flushed) write goes into the
#: second half, where nothing overwrites it.
WORK = 4 * MiB
CONFIRMED = 64 * 1024


def kill(nbd: NbdServer) -> None:
    """SIGKILL of the export's process (nbdkit: `tlog nbd` execs it)."""
    nbd.process.kill()
    nbd.process.wait(timeout=WAIT)


@contextmanager
def paused(server: ServerProcess, pause: bool) -> Iterator[None]:
    """The tlogserver stopped (SIGSTOP) while inside, when ``pause``."""
    pid = server.process.pid if server.process is not None else None
    if pause and pid is not None:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        if pause and pid is not None:
            os.kill(pid, signal.SIGCONT)


def restored(redis6: list[RedisProcess], vdisk: str, out: Path, size: int = SIZE) -> bytes:
    tlog_cli("restore", *read_args(redis6, vdisk), "--size", str(size), "--output", str(out),
             "--state-file", str(out) + ".state")
    return out.read_bytes()


def unflushed_write(nbd: NbdServer, image: Path, pattern: int, offset: int,
                    length: int) -> subprocess.Popen[bytes]:
    """A write the export took and no FLUSH confirmed: qemu-io's write is on the image (the
    plugin wrote it after logging it), its FLUSH at close still waiting (the tlogserver is
    paused). The caller kills the export, then the writer."""
    writer = subprocess.Popen(["qemu-io", "-f", "raw", "-c",
                               f"write -P {pattern} {offset} {length}", nbd.uri],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    want = bytes([pattern]) * length
    deadline = time.monotonic() + WAIT
    with image.open("rb") as stream:
        while True:  # nothing to wait on: the plugin's pwrite shows in the file
            stream.seek(offset)
            if stream.read(length) == want:
                return writer
            assert writer.poll() is None and time.monotonic() < deadline, "write not taken"
            time.sleep(0.01)


def test_both_scenarios_of_the_issue(redis6: list[RedisProcess], tmp_path: Path) -> None:
    """1 MiB written and flushed; the tlogserver paused; 1 MiB more written, not flushed
    (the plugin's client holds it); SIGKILL; the tlogserver resumed. Image ahead of the log:
    started again as it is. Log ahead of the image: the image put back as the FLUSH left
    it (a crash of the machine losing its page cache) first. Either way the restart
    recovers, and after one more write and a FLUSH the restore equals the served image."""
    for case, revert in (("ahead", False), ("behind", True)):
        image = tmp_path / f"{case}.img"
        sock = str(tmp_path / f"{case}.sock")
        with start_tlogserver(redis6, KEY) as server:
            args = nbd_args(server, case, image, "--size", "16M")
            with NbdServer(tmp_path, *args, socket_path=sock) as nbd:
                qemu_io(nbd.uri, f"write -P 0x11 0 {MiB}", "flush")
                at_flush = image.read_bytes()
                with paused(server, True):
                    writer = unflushed_write(nbd, image, 0x22, MiB // 2, MiB)
                    kill(nbd)
                    writer.kill()
                    writer.wait(timeout=WAIT)
            if revert:
                image.write_bytes(at_flush)
            with NbdServer(tmp_path, *args, socket_path=sock) as nbd:
                line = nbd.wait_for("recovered after an unclean stop")
                assert "looked at 256 block(s)" in line, line  # the 1 MiB not flushed
                qemu_io(nbd.uri, f"write -P 0x33 {3 * MiB} 65536", "flush")
                assert nbd.stop() == 0
                assert "stopped cleanly" in nbd.log
        served = image.read_bytes()
        assert restored(redis6, case, tmp_path / f"{case}-restored.img", 16 * MiB) == served
        assert served[:MiB // 2] == b"\x11" * (MiB // 2)  # flushed, never written again
        assert served[3 * MiB:3 * MiB + 65536] == b"\x33" * 65536
        # what was not flushed: either side may win, but all of one write or the other
        middle = served[MiB // 2:MiB]
        assert middle in (b"\x11" * (MiB // 2), b"\x22" * (MiB // 2)), case


def test_a_clean_stop_needs_no_recovery(redis6: list[RedisProcess], tmp_path: Path) -> None:
    image = tmp_path / "clean.img"
    sock = str(tmp_path / "clean.sock")
    with start_tlogserver(redis6, KEY) as server:
        args = nbd_args(server, "clean", image, "--size", "4M")
        for round_ in range(2):
            with NbdServer(tmp_path, *args, socket_path=sock) as nbd:
                if round_:
                    assert "clean start, device and log agree at epoch 0, sequence 255" in nbd.log
                assert "recovered" not in nbd.log
                qemu_io(nbd.uri, f"write -P 0x44 {round_ * MiB} {MiB}", "flush")
                assert nbd.stop() == 0
    assert restored(redis6, "clean", tmp_path / "r.img", 4 * MiB) == image.read_bytes()


def workload(kind: str, uri: str, data: Path) -> subprocess.Popen[bytes]:
    """An NBD client writing the first `WORK` bytes of the export, until it is killed."""
    if kind == "nbdcopy":
        argv = ["nbdcopy", "--request-size=65536", str(data), uri]
    else:
        argv = ["fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                "--bs=4k", "--iodepth=16", f"--size={WORK}", "--time_based", "--runtime=30",
                "--randrepeat=0", "--output=/dev/null"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.parametrize("backend", ["file", "redis"])
def test_kills_at_random_moments_during_writes(redis6: list[RedisProcess],
                                               redis_factory: RedisFactory, tmp_path: Path,
                                               backend: str) -> None:
    """Round after round: start (recovering from the round before), a confirmed write and
    a FLUSH, then the restore must equal the served device; then nbdcopy or fio random
    writes, the tlogserver paused at a random moment or not, and SIGKILL at a random
    moment. With the file backend, some rounds also put the image back as the FLUSH left
    it (a crash of the machine). Every confirmed write stays."""
    rng = random.Random(27)
    rounds = 20 if backend == "file" else 8
    image = tmp_path / "served.img"
    sock = str(tmp_path / "vd.sock")
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(WORK))
    confirmed: dict[int, int] = {}  # offset -> pattern of a write a FLUSH confirmed
    recoveries = 0
    with start_tlogserver(redis6, KEY) as server:
        if backend == "file":
            args = nbd_args(server, "kills", image, "--size", str(SIZE))
        else:
            (store,) = redis_factory(1)
            args = ["--vdisk", "kills", "--server", server.address, "--backend", "redis",
                    "--redis", store.address, "--size", str(SIZE)]
        for round_ in range(rounds + 1):
            with NbdServer(tmp_path, *args, socket_path=sock) as nbd:
                if round_:
                    nbd.wait_for("recovered after an unclean stop")
                    recoveries += 1
                offset = WORK + (round_ % (WORK // CONFIRMED)) * CONFIRMED
                pattern = 1 + round_ % 250
                qemu_io(nbd.uri, f"write -P {pattern} {offset} {CONFIRMED}", "flush")
                confirmed[offset] = pattern
                served = device(nbd, image, tmp_path, backend)
                assert restored(redis6, "kills", tmp_path / "r.img") == served, round_
                for at, value in confirmed.items():
                    assert served[at:at + CONFIRMED] == bytes([value]) * CONFIRMED, round_
                if round_ == rounds:
                    assert nbd.stop() == 0
                    break
                revert = backend == "file" and rng.random() < 0.3
                at_flush = image.read_bytes() if revert else b""
                kind = rng.choice(["nbdcopy", "fio"])
                pause = rng.random() < 0.5
                writer = workload(kind, nbd.uri, data)
                try:
                    time.sleep(rng.uniform(0.05, 0.4))  # the moment of the pause
                    with paused(server, pause):
                        time.sleep(rng.uniform(0.0, 0.3))  # the moment of the kill
                        kill(nbd)
                finally:
                    writer.kill()
                    writer.wait(timeout=WAIT)
                if revert:
                    image.write_bytes(at_flush)
    assert recoveries == rounds


def device(nbd: NbdServer, image: Path, tmp_path: Path, backend: str) -> bytes:
    """The served device's bytes, with nothing in flight: the image file, or a read of the
    export (the Redis block store)."""
    if backend == "file":
        return image.read_bytes()
    copy = tmp_path / "device.img"
    subprocess.run(["nbdcopy", nbd.uri, str(copy)], check=True, timeout=WAIT * 4)
    return copy.read_bytes()


def test_recoveries_in_the_log_and_the_metrics(redis6: list[RedisProcess],
                                               tmp_path: Path) -> None:
    """A recovery is counted in the device's state and shown by the export's metrics; a
    clean restart counts none."""
    from .serverproc import pick_port
    from .test_operations import scrape, value

    image = tmp_path / "m.img"
    sock = str(tmp_path / "m.sock")
    metrics = pick_port()
    with start_tlogserver(redis6, KEY) as server:
        args = [*nbd_args(server, "metered", image, "--size", "4M"),
                "--metrics-address", f"127.0.0.1:{metrics}"]
        with NbdServer(tmp_path, *args, socket_path=sock) as nbd:
            nbd.wait_for("metrics on http://127.0.0.1")
            samples = asyncio.run(scrape(metrics))
            assert value(samples, "tlog_nbd_recoveries_total", vdisk="metered") == 0
            with paused(server, True):
                writer = unflushed_write(nbd, image, 0x55, 0, 65536)
                kill(nbd)
                writer.kill()
                writer.wait(timeout=WAIT)
        for round_ in range(2):  # recovering, then clean
            with NbdServer(tmp_path, *args, socket_path=sock) as nbd:
                nbd.wait_for("metrics on http://127.0.0.1")
                samples = asyncio.run(scrape(metrics))
                assert value(samples, "tlog_nbd_recoveries_total", vdisk="metered") == 1
                if round_ == 0:
                    assert "recovered after an unclean stop" in nbd.log
                    assert value(samples, "tlog_nbd_last_recovery_blocks",
                                 vdisk="metered") == 16
                else:
                    assert "clean start" in nbd.log and "recovered" not in nbd.log
                qemu_io(nbd.uri, f"write -P {round_ + 1} 65536 4096", "flush")
                samples = asyncio.run(scrape(metrics))
                assert value(samples, "tlog_nbd_checkpoints_total", vdisk="metered") >= 1
                assert value(samples, "tlog_nbd_device_syncs_total", vdisk="metered") >= 1
                assert value(samples, "tlog_nbd_written_blocks_total", vdisk="metered") == 1
                assert value(samples, "tlog_nbd_failed_requests_total", vdisk="metered") == 0
                assert nbd.stop() == 0
    assert restored(redis6, "metered", tmp_path / "r.img", 4 * MiB) == image.read_bytes()


def test_background_checkpoints_sync_nothing_and_bound_the_recovery(
        redis6: list[RedisProcess], tmp_path: Path) -> None:
    """A client that never flushes (nbdcopy without --flush) gets background checkpoints
    every --checkpoint-bytes that clear the block marks of what the log has, without
    syncing the device: after a kill -9 the recovery looks at fewer blocks than were
    written. Their regions stay marked: with the state made to look like a crash of the
    machine, the recovery takes every region written. The restore equals the device."""
    from tlog.nbd.intent import FileIntentLog

    from .serverproc import pick_port
    from .test_operations import scrape, value

    image = tmp_path / "bg.img"
    sock = str(tmp_path / "bg.sock")
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(8 * MiB))
    written = 8 * MiB // 4096
    metrics = pick_port()
    with start_tlogserver(redis6, KEY) as server:
        args = [*nbd_args(server, "bg", image, "--size", "16M"), "--checkpoint-bytes", "1M"]
        for machine_crash in (False, True):
            with NbdServer(tmp_path, *args, "--metrics-address", f"127.0.0.1:{metrics}",
                           socket_path=sock) as nbd:
                nbd.wait_for("metrics on http://127.0.0.1")
                subprocess.run(["nbdcopy", str(data), nbd.uri], check=True, timeout=WAIT * 4)
                deadline = time.monotonic() + WAIT
                while True:  # the checkpoints run in the background: until two are done
                    samples = asyncio.run(scrape(metrics))
                    if value(samples, "tlog_nbd_checkpoints_total", vdisk="bg") >= 2:
                        break
                    assert time.monotonic() < deadline, "no background checkpoints"
                    time.sleep(0.05)
                assert value(samples, "tlog_nbd_device_syncs_total", vdisk="bg") == 0
                kill(nbd)
            if machine_crash:  # the block marks were never synced: not to be trusted
                intent = FileIntentLog(f"{image}.tlog-state", 4096, 16 * MiB)
                state = intent.load()
                assert state is not None
                state.boot_id = "another boot"
                intent.save(state)
                intent.close()
            with NbdServer(tmp_path, *args, socket_path=sock) as nbd:
                line = nbd.wait_for("recovered after an unclean stop")
                looked = int(line.split("looked at ")[1].split(" block")[0])
                if machine_crash:
                    assert looked >= written, line  # the two regions written, whole
                else:  # at least the writes before the second checkpoint began were cleared
                    assert looked <= written - 256, line
                qemu_io(nbd.uri, "write -P 0x77 0 4096", "flush")
                assert nbd.stop() == 0
            served = image.read_bytes()
            assert restored(redis6, "bg", tmp_path / "r.img", 16 * MiB) == served
            assert served[4096:8 * MiB] == data.read_bytes()[4096:]
