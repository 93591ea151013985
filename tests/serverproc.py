"""A real tlogserver in a subprocess, for tests and benchmarks.

`ServerProcess` runs ``python -m tlogserver --address 127.0.0.1:PORT ...`` and
returns from `start` only once the server logged that it listens, so a test
never races the bind. The port is chosen once and kept: `kill` (SIGKILL, a
crash) or `terminate` (SIGTERM, a drain) followed by `start` brings the server
back on the same address, which is what a client reconnecting expects.

The server's stderr is drained continuously by a thread (a full pipe would
block the server) into a bounded in-memory tail, optionally also into a log
file; `wait_for_log` waits for a line to show up, with a deadline.

Ports are picked below the kernel's ephemeral range: a client that keeps
reconnecting to a port inside that range while no server listens there can
be handed that very port as its own source port and connect to itself.
"""

from __future__ import annotations

import atexit
import collections
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from tlog.protocol.wire import Block

START_TIMEOUT = 20.0
STOP_TIMEOUT = 30.0
LISTENING = re.compile(r"listening on (\S+):(\d+)")
_TAIL_LINES = 400

_running: set[ServerProcess] = set()


def config_free_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment without TLOG_* configuration variables, so that a subprocess gets only
    what its test gives it, except TLOG_NO_EXTENSIONS: make test's pure-Python pass runs its
    subprocesses (tlogserver, tlog, nbdkit's plugin) on the pure-Python path too."""
    return {k: v for k, v in (os.environ if base is None else base).items()
            if not k.startswith("TLOG_") or k == "TLOG_NO_EXTENSIONS"}


class ServerStartError(RuntimeError):
    """The server exited, or did not listen, before the deadline."""

    def __init__(self, message: str, port_in_use: bool = False) -> None:
        super().__init__(message)
        self.port_in_use = port_in_use


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def pick_port(host: str = "127.0.0.1") -> int:
    """A port free right now on ``host``, outside the ephemeral range when possible."""
    low, _ = _ephemeral_range()
    candidates: Iterable[int] = []
    if low > 12000:
        candidates = random.sample(range(10000, low - 1), 50)
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """One tlogserver subprocess on a fixed loopback port; restartable.

    ``args`` are extra tlogserver flags (``"--memory-storage"``, ``"--flush-size", "25"``...).
    """

    def __init__(self, *args: str, host: str = "127.0.0.1", port: int | None = None,
                 log_path: Path | str | None = None, env: dict[str, str] | None = None,
                 python: str = sys.executable) -> None:
        self.args = [str(a) for a in args]
        self.host = host
        self.port = port if port is not None else pick_port(host)
        self.log_path = Path(log_path) if log_path is not None else None
        self.env = env
        self.python = python
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._lines: collections.deque[tuple[int, str]] = collections.deque(maxlen=_TAIL_LINES)
        self._cond = threading.Condition()
        self._listening = False
        self._reader: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"ServerProcess({self.address}, {'running' if self.running else 'stopped'})"

    # -- facts --
    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def command(self) -> list[str]:
        return [self.python, "-m", "tlogserver", "--address", self.address, *self.args]

    def output(self, current_run: bool = False) -> str:
        """The last lines the server logged (all of its runs, or only the current one's)."""
        with self._cond:
            return "\n".join(line for run, line in self._lines
                             if not current_run or run == self.starts)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the running server, from /proc."""
        if self.process is None:
            return 0.0
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    # -- lifecycle --
    def start(self, timeout: float = START_TIMEOUT) -> ServerProcess:
        """Start (or restart) on the same port; return once it listens."""
        if self.running:
            raise RuntimeError(f"tlogserver {self.address} is already running")
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with self._cond:
            self._listening = False
            self.starts += 1
            run = self.starts
        process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        self.process = process
        _running.add(self)
        self._reader = threading.Thread(target=self._read_stderr, args=(process, run),
                                        name=f"tlogserver {self.address} stderr", daemon=True)
        self._reader.start()
        try:
            self._wait_listening(process, timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _read_stderr(self, process: subprocess.Popen[bytes], run: int) -> None:
        assert process.stderr is not None
        log = open(self.log_path, "a", encoding="utf-8") if self.log_path else None  # noqa: SIM115
        try:
            for raw in process.stderr:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if log is not None:
                    log.write(line + "\n")
                    log.flush()
                with self._cond:
                    self._lines.append((run, line))
                    if run == self.starts and LISTENING.search(line):
                        self._listening = True
                    self._cond.notify_all()
        finally:
            if log is not None:
                log.close()
            with self._cond:
                self._cond.notify_all()

    def _wait_listening(self, process: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._listening:
                if process.poll() is not None:
                    # Let the reader thread catch the last lines before reporting them.
                    self._cond.wait(0.2)
                    out = "\n".join(line for _, line in list(self._lines)[-30:])
                    raise ServerStartError(
                        f"tlogserver {self.address} exited with code {process.returncode}:\n{out}",
                        port_in_use="address already in use" in out.lower())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServerStartError(f"tlogserver {self.address} did not listen within "
                                           f"{timeout} s:\n{self.output()[-3000:]}")
                self._cond.wait(min(left, 0.1))

    def wait_for_log(self, pattern: str, timeout: float = 10.0, any_run: bool = False) -> str:
        """Wait until a line matches ``pattern`` (a regex); return the line.

        Only lines of the current run count unless ``any_run``.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for run, line in self._lines:
                    if (any_run or run == self.starts) and regex.search(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no log line matching {pattern!r} within {timeout} s")
                self._cond.wait(min(left, 0.1))

    def _signal(self, sig: signal.Signals, timeout: float) -> int | None:
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            try:
                os.kill(process.pid, sig)
            except ProcessLookupError:
                pass
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            code = process.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=5)
        if process.stderr is not None:
            process.stderr.close()
        _running.discard(self)
        return code

    def kill(self) -> int | None:
        """SIGKILL (a crash: nothing is drained) and wait for the process to end."""
        return self._signal(signal.SIGKILL, 10)

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM (the server drains) and wait; SIGKILL after ``timeout``. The exit code."""
        return self._signal(signal.SIGTERM, timeout)

    def restart(self, down_for: float = 0.0) -> ServerProcess:
        """SIGKILL, stay down ``down_for`` seconds, start again on the same port."""
        self.kill()
        if down_for > 0:
            time.sleep(down_for)
        return self.start()

    def __enter__(self) -> ServerProcess:
        if not self.running:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()


def start_server(*args: str, attempts: int = 5, **kwargs: object) -> ServerProcess:
    """Start a server on a fresh port, picking another if that one got taken meanwhile."""
    last: ServerStartError | None = None
    for _ in range(attempts):
        server = ServerProcess(*args, **kwargs)  # type: ignore[arg-type]
        try:
            return server.start()
        except ServerStartError as exc:
            if not exc.port_in_use:
                raise
            last = exc
    raise ServerStartError(f"no free port after {attempts} attempts: {last}")


def storage_args(addresses: Sequence[str], *, priv_key: str = "12345678901234567890123456789012",
                 k: int = 4, m: int = 2) -> list[str]:
    """tlogserver flags for a redis pool (``RedisProcess.address`` values)."""
    return ["--storage-addresses", ",".join(addresses), "--priv-key", priv_key,
            "-k", str(k), "-m", str(m)]


async def stored_blocks(addresses: Sequence[str], vdisk_id: str,
                        priv_key: str = "12345678901234567890123456789012",
                        k: int = 4, m: int = 2) -> list[Block]:
    """Every block in a vdisk's stored chain, oldest aggregation first.

    Walks ``prev`` back from the newest aggregation (`tlog.read.head.find_last`) to
    the zero hash; duplicates (an aggregation stored again after a crash) are kept.
    """
    from tlog.read.fetch import read_aggregation
    from tlog.read.head import find_last
    from tlog.record.aggregation import Keyring, RecordOpener
    from tlog.record.crypto import parse_key
    from tlog.storage import any_pool_factory

    factory = any_pool_factory(k=k, m=m, addresses=",".join(addresses), allow_memory=False)
    opener = RecordOpener(Keyring.of(parse_key(priv_key, "priv-key")), None, "v2")
    try:
        pool = factory.pool_for(vdisk_id)
        agg = await find_last(pool, vdisk_id, opener)
        chunks: list[list[Block]] = []
        while agg is not None:
            chunks.append(list(agg.blocks))
            if agg.prev == bytes(32):
                break
            agg = await read_aggregation(pool, agg.prev, opener)
    finally:
        await factory.close()
    return [block for chunk in reversed(chunks) for block in chunk]


async def stored_sequences(addresses: Sequence[str], vdisk_id: str,
                           priv_key: str = "12345678901234567890123456789012",
                           k: int = 4, m: int = 2) -> list[int]:
    """The sequences of `stored_blocks`, in chain order."""
    return [b.sequence for b in await stored_blocks(addresses, vdisk_id, priv_key, k, m)]


@atexit.register
def _kill_leftovers() -> None:
    """Never leave a tlogserver behind, even when the test run is interrupted."""
    for server in list(_running):
        server.kill()
