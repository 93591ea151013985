"""What the benchmark scripts share: processes they start, figures they read, summaries.

Every benchmark starts its own redis-server and tlogserver processes on free loopback ports
(and kills them at the end, even when interrupted), reads CPU time and RSS from /proc, and
prints JSON on stdout (one object per run, then one summary object) with a short human
table on stderr, so `run_all.py` can collect the JSON and a person can read the table.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: The master key every benchmark server and reader uses (32 characters, as 0-Disk's).
KEY = "12345678901234567890123456789012"
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    """A loopback port free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, deadline: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Return once something accepts connections on ``port``; fail at ``deadline`` or when
    ``proc`` exits first."""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with code {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (its own threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size of a process now."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def python() -> str:
    """The interpreter the benchmarks run tlog's commands with (the one running them)."""
    return sys.executable


def tlog_command(*args: str) -> list[str]:
    """The argv of ``tlog ARGS`` with this interpreter."""
    return [python(), "-c", "from tlog.cli import main; main()", *args]


class RedisPool:
    """``count`` throw-away redis-server processes (no persistence), killed on exit."""

    def __init__(self, count: int = 6) -> None:
        self.count = count
        self.workdir = tempfile.mkdtemp(prefix="tlogbench-redis")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.ports]

    def __enter__(self) -> RedisPool:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not on PATH (make redis installs it)")
        try:
            for i in range(self.count):
                port = free_port()
                self.procs.append(subprocess.Popen(
                    ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", self.workdir, "--dbfilename", f"d{i}.rdb"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                self.ports.append(port)
            for proc, port in zip(self.procs, self.ports, strict=True):
                wait_listening(port, time.monotonic() + 10, proc)
        except BaseException:
            self.stop()
            raise
        return self

    def flush_all(self) -> None:
        """Empty every server (between runs that must not see each other's data)."""
        for port in self.ports:
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"*1\r\n$8\r\nFLUSHALL\r\n")
                s.recv(64)

    def cpu_seconds(self) -> float:
        """CPU seconds of all the servers together."""
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()
        self.procs.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TlogServer:
    """A tlogserver subprocess on a free port, killed on exit."""

    def __init__(self, *args: str, env: Mapping[str, str] | None = None) -> None:
        self.port = free_port()
        self.args = list(args)
        self.env = dict(os.environ if env is None else env)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> TlogServer:
        self.proc = subprocess.Popen(
            [python(), "-m", "tlogserver", "--address", self.address, *self.args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=self.env)
        try:
            wait_listening(self.port, time.monotonic() + 30, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def __exit__(self, *exc: object) -> None:
        self.stop()


def storage_args(addresses: Sequence[str], k: int = 4, m: int = 2) -> list[str]:
    """tlogserver / tlog reader flags for a pool of redis servers."""
    return ["--storage-addresses", ",".join(addresses), "--priv-key", KEY, "-k", str(k),
            "-m", str(m)]


def run_json(argv: Sequence[str], timeout: float = 600.0) -> dict[str, Any]:
    """Run a command that prints one JSON line; its object (the command's stderr on failure)."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}... failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of one figure over the runs."""
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def summarize(runs: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """`spread` of every key present (as a number) in every run."""
    out: dict[str, Any] = {}
    for key in keys:
        values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        if values and len(values) == len(runs):
            out[key] = spread(values)
    return out


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    redis_version = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        redis_version = subprocess.run(["redis-server", "--version"], capture_output=True,
                                       text=True, timeout=10).stdout.strip()
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "redis": redis_version, "load_average": [round(x, 2) for x in load]}


def busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: user, nice, system, irq,
    softirq, steal). Minus what a benchmark's own processes used, it is what others took
    during a run: the noise the figures suffered."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / TICKS


def children_cpu() -> float:
    """CPU seconds of this process's waited-for children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def load_average() -> float:
    """The 1-minute load average now: runs taken while something else loaded the machine
    show it (the machine this was written on is shared, and 2 cores are easily busy)."""
    return round(os.getloadavg()[0], 2)


def emit(obj: Mapping[str, Any]) -> None:
    """One JSON line on stdout, flushed (run_all.py reads them as they come)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def table(title: str, rows: Sequence[tuple[str, Mapping[str, Any] | float | int | str | None]],
          ) -> None:
    """A short human table on stderr: one figure per row, median [min..max] when spread."""
    print(f"\n{title}", file=sys.stderr)
    width = max((len(name) for name, _ in rows), default=10)
    for name, value in rows:
        if isinstance(value, Mapping):
            text = f"{value['median']:>12,.2f}  [{value['min']:,.2f} .. {value['max']:,.2f}]"
        elif isinstance(value, float):
            text = f"{value:>12,.2f}"
        elif value is None:
            text = f"{'-':>12}"
        else:
            text = f"{value!s:>12}"
        print(f"  {name:<{width}}  {text}", file=sys.stderr)


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
