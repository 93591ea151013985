"""`tlog nbd`: a real nbdkit serving a vdisk, real NBD clients (nbdcopy, qemu-io) writing to
it, a real tlogserver on six real redis-servers logging it; `tlog restore` must give back
the served image byte for byte.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import pytest
import redis
import yaml

from tlog import compiled

from .redis_fixture import RedisFactory, RedisProcess
from .serverproc import ServerProcess, config_free_env
from .test_cli_read import KEY, WAIT, read_args, start_tlogserver, tlog_cli

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nbdkit", "nbdcopy", "qemu-io")),
    reason="nbdkit, nbdcopy or qemu-io missing (make test installs them)")

SIZE = 16 * 1024 * 1024


class NbdServer:
    """`tlog nbd` in a subprocess on a unix socket; its stderr collected line by line."""

    def __init__(self, tmp_path: Path, *args: str, socket_path: str | None = None) -> None:
        self.socket = socket_path or str(tmp_path / f"nbd-{time.monotonic_ns()}.sock")
        self.uri = f"nbd+unix:///?socket={self.socket}"
        self._start("--socket", self.socket, *args)

    def _start(self, *args: str) -> None:
        """`tlog nbd ARGS` started (without TLOG_* configuration), its stderr read."""
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from tlog.cli import main; main()", "nbd", *args],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            env=config_free_env())
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append("<eof>")
            self._cond.notify_all()

    def wait_for(self, text: str, timeout: float = WAIT, after: str | None = None) -> str:
        """The first stderr line containing ``text`` (after the first one containing
        ``after``, if given); TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                seen = after is None
                for line in self.lines:
                    if seen and text in line:
                        return line
                    seen = seen or (after is not None and after in line)
                if "<eof>" in self.lines:
                    raise AssertionError(f"tlog nbd ended without {text!r}: {self.log}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {text!r} within {timeout} s: {self.log}")
                self._cond.wait(left)

    def lines_with(self, text: str, count: int, timeout: float = WAIT) -> list[str]:
        """The first ``count`` stderr lines containing ``text``, once there are as many."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [line for line in self.lines if text in line]
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                if "<eof>" in self.lines or left <= 0:
                    raise AssertionError(f"{len(found)} of {count} {text!r} lines: {self.log}")
                self._cond.wait(left)

    def ready(self) -> NbdServer:
        self.wait_for("serving vdisk")
        # the socket is listened on before the plugin's after_fork: check it answers
        with socket.socket(socket.AF_UNIX) as probe:
            probe.settimeout(WAIT)
            probe.connect(self.socket)
        return self

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def stop(self, timeout: float = WAIT) -> int:
        """SIGTERM, as an operator would; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise AssertionError(f"tlog nbd did not stop within {timeout} s: {self.log}"
                                 ) from None
        self._reader.join(timeout=5)
        return code

    def __enter__(self) -> NbdServer:
        return self.ready()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def qemu_io(uri: str, *commands: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    proc = subprocess.run([*argv, uri], capture_output=True, text=True, timeout=WAIT)
    if check:
        assert proc.returncode == 0 and "error" not in proc.stdout.lower(), (
            proc.stdout + proc.stderr)
    return proc


def nbdcopy(source: str, target: str) -> None:
    proc = subprocess.run(["nbdcopy", source, target], capture_output=True, text=True,
                          timeout=WAIT * 4)
    assert proc.returncode == 0, proc.stderr


def nbd_args(server: ServerProcess, vdisk: str, image: Path, *extra: str) -> list[str]:
    return ["--vdisk", vdisk, "--server", server.address, "--image", str(image), *extra]


def restore(redis6: Sequence[RedisProcess], vdisk: str, out: Path, size: int = SIZE) -> bytes:
    # The size as docs/nbd.md writes it (16M): every command takes the same sizes.
    text = f"{size >> 20}M" if size % (1 << 20) == 0 else str(size)
    tlog_cli("restore", *read_args(redis6, vdisk), "--size", text, "--output", str(out))
    return out.read_bytes()


def test_nbd_clients_write_and_the_restore_equals_the_served_image(
        redis6: list[RedisProcess], tmp_path: Path) -> None:
    image = tmp_path / "served.img"
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(8 * 1024 * 1024))
    with start_tlogserver(redis6, KEY) as server:
        with NbdServer(tmp_path, *nbd_args(server, "nbd1", image, "--size", "16M")) as nbd:
            # nbdkit's embedded Python (Debian's 3.11) loads the compiled modules when
            # they are built, as the venv's Python does.
            modules = nbd.wait_for("per-block modules")
            if compiled.why_pure() is None:
                assert "per-block modules compiled (" in modules, modules
            else:
                assert "per-block modules in pure Python" in modules, modules
            nbdcopy(str(data), nbd.uri)  # 8 MiB of random data, aligned
            qemu_io(nbd.uri,
                    "write -P 0xab 1000 5000",          # unaligned: two partial blocks
                    "write -P 0xcd 9000000 3",           # inside one block
                    "write -z 40960 8192",               # zero, whole blocks: deletes
                    "write -z 100 200",                  # zero inside a block
                    "discard 65536 65536",               # trim, whole blocks
                    "discard 131000 3000",               # trim of partial blocks: no-op
                    "write -f -P 0xee 200000 4096",      # FUA write
                    "flush")
            assert nbd.stop() == 0
    served = image.read_bytes()
    assert len(served) == SIZE
    assert served[1000:6000] == b"\xab" * 5000 and served[40960:49152] == bytes(8192)
    assert served[65536:131072] == bytes(65536) and served[100:300] == bytes(200)
    assert served[131072:134000] == data.read_bytes()[131072:134000]  # the partial trim
    assert restore(redis6, "nbd1", tmp_path / "restored.img") == served
    verify = tlog_cli("verify", *read_args(redis6, "nbd1"))
    assert "chain sound" in verify.stdout


def test_starting_again_continues_the_log(redis6: list[RedisProcess], tmp_path: Path) -> None:
    image = tmp_path / "served.img"
    sock = str(tmp_path / "again.sock")  # the same socket each time: nbdkit leaves it behind
    with start_tlogserver(redis6, KEY) as server:
        for round_, pattern in enumerate(("0x11", "0x22")):
            with NbdServer(tmp_path, *nbd_args(server, "again", image, "--size", "16M"),
                           socket_path=sock) as nbd:
                line = nbd.wait_for("serving vdisk")
                assert ("from sequence 0" in line) == (round_ == 0), line
                qemu_io(nbd.uri, f"write -P {pattern} {round_ * 4096} 40000", "flush")
                if round_ == 0:  # a second tlog nbd on a socket in use: refused, one line
                    proc = subprocess.run(
                        [sys.executable, "-c", "from tlog.cli import main; main()", "nbd",
                         "--socket", sock, *nbd_args(server, "other", tmp_path / "o.img",
                                                     "--size", "1M")],
                        capture_output=True, text=True, timeout=WAIT)
                    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
                        f"Error: --socket {sock}: something is listening on it already "
                        "(another tlog nbd?)"], proc.stderr
                assert nbd.stop() == 0
            assert os.path.exists(sock)  # left behind: the next start removes it
    served = image.read_bytes()
    assert restore(redis6, "again", tmp_path / "restored.img") == served
    verify = tlog_cli("verify", *read_args(redis6, "again"))
    assert "chain sound" in verify.stdout and "epoch" not in verify.stdout + verify.stderr


def test_connections_that_come_and_go_leave_no_thread_state_behind(
        redis6: list[RedisProcess], tmp_path: Path) -> None:
    # The plugin keeps each nbdkit worker's Python thread state while the worker lives
    # (tlog.nbd.threadstate); a connection's workers end with it, and so must their states.
    image = tmp_path / "served.img"
    connections = 4
    with start_tlogserver(redis6, KEY) as server:
        with NbdServer(tmp_path, *nbd_args(server, "conns", image, "--size", "16M"),
                       "--verbose") as nbd:
            for i in range(connections):
                qemu_io(nbd.uri, f"write -P {i + 1} {i * 65536} 65536",
                        f"read -P {i + 1} {i * 65536} 65536")
                nbd.lines_with("worker thread states:", i + 1)
            lines = nbd.lines_with("worker thread states:", connections)
            assert nbd.stop() == 0
    counts = [re.search(r"(\d+) released, (\d+) kept", line) for line in lines]
    assert all(m is not None for m in counts), lines
    released = [int(m.group(1)) for m in counts if m is not None]
    kept = [int(m.group(2)) for m in counts if m is not None]
    assert kept == [0] * connections and all(n >= 1 for n in released), lines
    assert restore(redis6, "conns", tmp_path / "restored.img") == image.read_bytes()


def test_a_tlogserver_killed_mid_copy_and_restarted(redis6: list[RedisProcess],
                                                   tmp_path: Path) -> None:
    """kill -9 of the tlogserver while nbdcopy writes: the client reconnects and resends,
    the copy completes, and the restore equals the served image."""
    image = tmp_path / "served.img"
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(SIZE))
    store = redis.Redis(host="127.0.0.1", port=redis6[0].port)
    with start_tlogserver(redis6, KEY) as server:
        with NbdServer(tmp_path, *nbd_args(server, "crash", image, "--size", "16M")) as nbd:
            copy = subprocess.Popen(["nbdcopy", str(data), nbd.uri], stderr=subprocess.PIPE,
                                    text=True)
            deadline = time.monotonic() + WAIT
            # Some rounds stored: the log is mid-stream (the copy itself may be done by
            # then, into the client's 32 MiB buffer, on a busy machine).
            while store.llen(b"last_hash_crash") < 2:
                assert time.monotonic() < deadline, "nothing stored"
                time.sleep(0.005)
            server.restart(down_for=0.3)
            _, err = copy.communicate(timeout=WAIT * 4)
            assert copy.returncode == 0, err
            nbd.wait_for("reconnecting")
            try:
                nbd.wait_for("connected to", after="reconnecting")
                assert nbd.stop() == 0
            except (AssertionError, TimeoutError) as exc:
                raise AssertionError(f"{exc}\n--- tlogserver:\n{server.output()}") from None
    served = image.read_bytes()
    assert served == data.read_bytes()
    assert restore(redis6, "crash", tmp_path / "restored.img") == served


def test_rollback_by_sequence_and_time_of_a_vdisk_written_over_nbd(
        redis6: list[RedisProcess], tmp_path: Path) -> None:
    image = tmp_path / "served.img"
    with start_tlogserver(redis6, KEY) as server:
        with NbdServer(tmp_path, *nbd_args(server, "rollback", image, "--size", "4M")) as nbd:
            qemu_io(nbd.uri, "write -P 0x61 0 100000", "flush")
            assert nbd.stop() == 0
        before = image.read_bytes()
        between = time.time_ns()
        with NbdServer(tmp_path, *nbd_args(server, "rollback", image)) as nbd:
            first = int(nbd.wait_for("serving vdisk").rsplit(" ", 1)[1])
            qemu_io(nbd.uri, "write -P 0x62 50000 100000", "discard 0 8192", "flush")
            assert nbd.stop() == 0
    assert image.read_bytes() != before
    size = str(4 << 20)
    by_sequence = tmp_path / "by-seq.img"
    tlog_cli("restore", *read_args(redis6, "rollback"), "--end-sequence", str(first - 1),
             "--size", size, "--output", str(by_sequence))
    assert by_sequence.read_bytes() == before
    by_time = tmp_path / "by-time.img"
    tlog_cli("restore", *read_args(redis6, "rollback"), "--end-timestamp", str(between),
             "--size", size, "--output", str(by_time))
    assert by_time.read_bytes() == before
    assert restore(redis6, "rollback", tmp_path / "now.img", 4 << 20) == image.read_bytes()


def test_flush_fails_with_eio_when_the_tlog_servers_are_gone(
        redis6: list[RedisProcess], tmp_path: Path) -> None:
    image = tmp_path / "served.img"
    server = start_tlogserver(redis6, KEY)
    try:
        with NbdServer(tmp_path, *nbd_args(server, "down", image, "--size", "4M",
                                           "--flush-timeout", "1")) as nbd:
            qemu_io(nbd.uri, "write -P 0x01 0 8192", "flush")
            server.kill()
            started = time.monotonic()
            proc = qemu_io(nbd.uri, "write -P 0x02 0 8192", "flush", check=False)
            assert "flush failed" in (proc.stdout + proc.stderr).lower() or proc.returncode
            assert "Input/output error" in proc.stdout + proc.stderr
            assert time.monotonic() - started < WAIT
            # qemu-io may send the write with FUA: either the FUA write or the flush fails
            line = nbd.wait_for("did not confirm the writes within 1 s")
            assert "vdisk down:" in line and "failed: the tlog servers" in line
            nbd.stop()
    finally:
        server.kill()


def test_a_trim_of_the_whole_device_and_large_zeroes(redis6: list[RedisProcess],
                                                     tmp_path: Path) -> None:
    # 64 MiB is 16,384 blocks: a whole-device discard (mkfs does one) and large zeroes,
    # each one range entry of the log, with writes over them.
    image = tmp_path / "served.img"
    size = 64 << 20
    with start_tlogserver(redis6, KEY) as server:
        with NbdServer(tmp_path, *nbd_args(server, "trim", image, "--size", "64M")) as nbd:
            qemu_io(nbd.uri, f"write -P 0x77 0 {size}", "flush",
                    f"discard 0 {size}",
                    "write -P 0x42 40000000 100000",
                    "write -P 0x43 1000 50000000",
                    "write -z 3000 45000000",
                    "flush")
            assert nbd.stop() == 0
    served = image.read_bytes()
    expected = bytearray(size)
    expected[40000000:40100000] = b"\x42" * 100000
    expected[1000:50001000] = b"\x43" * 50000000
    expected[3000:45003000] = bytes(45000000)
    assert served == expected
    assert restore(redis6, "trim", tmp_path / "restored.img", size) == served


def test_a_readonly_export_of_a_restored_image(redis6: list[RedisProcess],
                                              tmp_path: Path) -> None:
    image = tmp_path / "served.img"
    with start_tlogserver(redis6, KEY) as server:
        with NbdServer(tmp_path, *nbd_args(server, "ro", image, "--size", "4M")) as nbd:
            qemu_io(nbd.uri, "write -P 0x5a 12345 100000", "flush")
            assert nbd.stop() == 0
    restored = tmp_path / "restored.img"
    tlog_cli("restore", *read_args(redis6, "ro"), "--size", str(4 << 20), "--output",
             str(restored))
    with NbdServer(tmp_path, "--vdisk", "ro", "--readonly", "--image", str(restored)) as nbd:
        copy = tmp_path / "copy.img"
        nbdcopy(nbd.uri, str(copy))
        assert copy.read_bytes() == image.read_bytes()
        refused = qemu_io(nbd.uri, "write -P 0x01 0 512", check=False)
        assert "read-only" in (refused.stdout + refused.stderr).lower() or refused.returncode
        assert restored.read_bytes() == image.read_bytes()
        assert nbd.stop() == 0


def test_the_redis_block_store_as_backend(redis6: list[RedisProcess], redis_factory: RedisFactory,
                                          tmp_path: Path) -> None:
    image = tmp_path / "served.img"
    (store,) = redis_factory(1)
    with start_tlogserver(redis6, KEY) as server:
        with NbdServer(tmp_path, *nbd_args(server, "rb", image, "--size", "4M")) as nbd:
            qemu_io(nbd.uri, "write -P 0x33 5000 20000", "write -z 8192 4096", "flush")
            assert nbd.stop() == 0
        tlog_cli("restore", *read_args(redis6, "rb"), "--output-redis", store.address)
        # Serve the block store, write through it, and the log still restores to it.
        with NbdServer(tmp_path, "--vdisk", "rb", "--server", server.address, "--backend",
                       "redis", "--redis", store.address, "--size", "4M") as nbd:
            copy = tmp_path / "copy.img"
            nbdcopy(nbd.uri, str(copy))
            assert copy.read_bytes() == image.read_bytes()
            qemu_io(nbd.uri, "write -P 0x44 100 10", "flush")
            nbdcopy(nbd.uri, str(copy))
            assert nbd.stop() == 0
    assert restore(redis6, "rb", tmp_path / "restored.img")[:4 << 20] == copy.read_bytes()


def test_failover_to_the_standby_when_the_backend_dies_mid_copy(
        redis6: list[RedisProcess], redis_factory: RedisFactory, tmp_path: Path) -> None:
    """The served blocks live in a redis block store that is killed while nbdcopy writes;
    the plugin waits until tlogserver's slave sync has the standby in step
    (WaitNbdSlaveSync), switches to it, and the copy completes: the standby serves the
    copied data, which the log restores to as well."""
    (primary,) = redis_factory(1)
    (standby,) = redis_factory(1)
    config = tmp_path / "tlogserver.yaml"
    config.write_text(yaml.safe_dump(
        {"vdisks": {"fo": {"slave_sync": True, "slave_server": standby.address}}}))
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(SIZE))
    with start_tlogserver(redis6, KEY, "--config", str(config), "--with-slave-sync") as server:
        with NbdServer(tmp_path, "--vdisk", "fo", "--server", server.address, "--backend",
                       "redis", "--redis", primary.address, "--size", "16M", "--standby",
                       standby.address) as nbd:
            copy = subprocess.Popen(["nbdcopy", str(data), nbd.uri], stderr=subprocess.PIPE,
                                    text=True)
            check = primary.client()
            deadline = time.monotonic() + WAIT
            while check.dbsize() < 200:  # the copy is under way
                assert time.monotonic() < deadline, "nothing written to the backend"
                time.sleep(0.005)
            primary.stop()  # SIGKILL: the backend is gone
            _, err = copy.communicate(timeout=WAIT * 4)
            assert copy.returncode == 0, f"{err}\n{nbd.log}"
            nbd.wait_for("now serving from the standby")
            served = tmp_path / "served.img"
            nbdcopy(nbd.uri, str(served))
            assert nbd.stop() == 0
        server.wait_for_log("slave sync ended")
    assert served.read_bytes() == data.read_bytes()
    assert restore(redis6, "fo", tmp_path / "restored.img") == data.read_bytes()


def test_missing_nbdkit_is_one_clear_line(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()  # a PATH without nbdkit
    env = {**os.environ, "PATH": str(bin_dir)}
    proc = subprocess.run([sys.executable, "-c", "from tlog.cli import main; main()", "nbd",
                           "--vdisk", "x", "--server", "127.0.0.1:1", "--image",
                           str(tmp_path / "i.img"), "--size", "1M", "--socket",
                           str(tmp_path / "s")], capture_output=True, text=True, timeout=WAIT,
                          env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "Error: nbdkit is not installed (Debian: apt-get install nbdkit nbdkit-plugin-python)"]


@pytest.mark.parametrize(("args", "message"), [
    (["--socket", "s", "--listen", "127.0.0.1:1"], "exactly one of --socket"),
    (["--socket", "s", "--size", "1000"], "not a multiple of the block size"),
    (["--socket", "s", "--size", "lots"], "not a size: 'lots'"),
    (["--socket", "s", "--size", "1M", "--server", "nowhere"], "not a host:port"),
    (["--socket", "s", "--size", "1M", "--threads", "0"], "--threads"),
])
def test_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    base = ["--vdisk", "x", "--image", str(tmp_path / "i.img")]
    if "--server" not in args:
        base += ["--server", "127.0.0.1:1"]
    proc = subprocess.run([sys.executable, "-c", "from tlog.cli import main; main()", "nbd",
                           *base, *args], capture_output=True, text=True, timeout=WAIT)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
