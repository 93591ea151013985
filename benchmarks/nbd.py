"""`tlog nbd` against nbdkit's plain file plugin, in the same run.

Each run, for random and for compressible data: a fresh tlogserver on 6 redis (k=4, m=2),
a new image served through `tlog nbd` on a unix socket, ``--mib`` MiB copied into it with
nbdcopy (without ``--flush``: the copy ends when nbdkit acknowledged the last write, so
the log's last flush window and the file plugin's page cache are not waited for; the
same for both); then the same with ``nbdkit file``, the ceiling of the machine. Then 4 KiB
writes, one NBD request each, queue depth 16, into both: sequential with ``qemu-img
bench``, and random with fio's nbd engine for ``--fio-seconds`` (Debian's ``fio``;
``make nbd`` installs it). Prints one JSON line per run, then medians over ``--runs``
with the ratio to the file plugin.

    .venv/bin/python benchmarks/nbd.py --mib 256 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RedisPool,
    TlogServer,
    emit,
    machine,
    scratch_dir,
    storage_args,
    summarize,
    table,
    tlog_command,
)


def wait_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Until the export's socket accepts a connection (the plugin may still be starting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the NBD server exited with {proc.returncode}")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(path))
                    return
                except OSError:
                    pass
        time.sleep(0.05)
    raise TimeoutError(f"{path} not served within {timeout} s")


def copy_into(argv: list[str], sock: Path, data: Path, ready_text: bytes | None) -> float:
    """Start the export, nbdcopy ``data`` into it; the copy's seconds."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if ready_text is not None:  # the plugin's after_fork: the client is connected
            assert proc.stderr is not None
            for line in proc.stderr:
                if ready_text in line:
                    break
        wait_socket(sock, proc)
        start = time.perf_counter()
        subprocess.run(["nbdcopy", str(data), f"nbd+unix:///?socket={sock}"], check=True,
                       timeout=600)
        return time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def qemu_bench(sock: Path, count: int) -> float:
    """Seconds for ``count`` 4 KiB writes at queue depth 16 (qemu-img bench)."""
    start = time.perf_counter()
    subprocess.run(["qemu-img", "bench", "-w", "-f", "raw", "-s", "4096", "-c", str(count),
                    "-d", "16", "-q", f"nbd+unix:///?socket={sock}"], check=True, timeout=600,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def fio_randwrite(sock: Path, size: int, seconds: float) -> float:
    """4 KiB random writes per second at queue depth 16 for ``seconds`` (fio, nbd engine)."""
    proc = subprocess.run(
        ["fio", "--name=randwrite", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
         "--rw=randwrite", "--bs=4k", "--iodepth=16", f"--size={size}", "--time_based",
         f"--runtime={seconds:g}", "--randrepeat=0", "--output-format=json"],
        check=True, timeout=seconds + 300, capture_output=True, text=True)
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    return float(report["jobs"][0]["write"]["iops"])


class Exports:
    """Starting one export of each kind on a new image, and measuring one job in it."""

    def __init__(self, tmp: Path, redis: RedisPool, size: int, fio_seconds: float) -> None:
        self.tmp, self.redis, self.size = tmp, redis, size
        self.fio_seconds = fio_seconds
        self.count = 0

    def measure(self, kind: str, job: str, data: Path | None, writes: int) -> float:
        """Seconds of a ``copy`` or a ``bench``; writes per second of ``fio``."""
        self.count += 1
        image, sock = self.tmp / f"{kind}{self.count}.img", self.tmp / f"{kind}{self.count}.sock"
        image.write_bytes(b"")
        os.truncate(image, self.size)
        try:
            if kind == "file":
                argv = ["nbdkit", "--foreground", "--unix", str(sock), "file", str(image)]
                return self._run(argv, sock, None, job, data, writes)
            self.redis.flush_all()
            with TlogServer(*storage_args(self.redis.addresses)) as server:
                argv = tlog_command("nbd", "--vdisk", f"bench{self.count}", "--server",
                                    server.address, "--image", str(image), "--socket",
                                    str(sock))
                return self._run(argv, sock, b"serving vdisk", job, data, writes)
        finally:
            image.unlink()

    def _run(self, argv: list[str], sock: Path, ready: bytes | None, job: str,
             data: Path | None, writes: int) -> float:
        if job == "copy":
            assert data is not None
            return copy_into(argv, sock, data, ready)
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            if ready is not None:
                assert proc.stderr is not None
                for line in proc.stderr:
                    if ready in line:
                        break
            wait_socket(sock, proc)
            if job == "fio":
                return fio_randwrite(sock, self.size, self.fio_seconds)
            return qemu_bench(sock, writes)
        finally:
            proc.terminate()
            proc.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--writes", type=int, default=20000, help="4 KiB writes per bench")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--fio-seconds", type=float, default=10.0,
                        help="seconds of fio random 4 KiB writes per export (0: none)")
    args = parser.parse_args()
    if not all(shutil.which(t) for t in ("nbdkit", "nbdcopy", "qemu-img")):
        raise SystemExit("nbdkit, nbdcopy and qemu-img are needed (make nbd installs them)")
    size = args.mib * 1024 * 1024
    runs = []
    with scratch_dir("tlogbench-nbd") as tmp, RedisPool(6) as redis:
        random_data, compressible = tmp / "random.bin", tmp / "compressible.bin"
        random_data.write_bytes(os.urandom(size))
        block = (b"tlog bench " * 400)[:4096]
        compressible.write_bytes(block * (size // 4096))
        fio = args.fio_seconds > 0 and shutil.which("fio") is not None
        if args.fio_seconds > 0 and not fio:
            print("fio is not installed (make nbd installs it): no random 4 KiB writes",
                  file=sys.stderr)
        exports = Exports(tmp, redis, size, args.fio_seconds)
        for run in range(args.runs):
            result: dict[str, object] = {"benchmark": "nbd", "run": run, "mib": args.mib}
            for name, data in (("random", random_data), ("compressible", compressible)):
                for kind in ("tlog", "file"):
                    seconds = exports.measure(kind, "copy", data, 0)
                    result[f"{kind}_{name}_mb_per_s"] = round(size / seconds / 1e6, 1)
            for kind in ("tlog", "file"):
                seconds = exports.measure(kind, "bench", None, args.writes)
                result[f"{kind}_4k_writes_per_s"] = round(args.writes / seconds)
            if fio:
                for kind in ("tlog", "file"):
                    iops = exports.measure(kind, "fio", None, 0)
                    result[f"{kind}_4k_random_writes_per_s"] = round(iops)
            emit(result)
            runs.append(result)
    keys = [k for k in runs[0] if k.endswith("_per_s")]
    summary = summarize(runs, keys)
    ratios = {f"{k[len('tlog_'):]}_ratio_to_file": round(
        summary[k]["median"] / summary["file_" + k[len("tlog_"):]]["median"], 3)
        for k in keys if k.startswith("tlog_")}
    emit({"benchmark": "nbd", "mib": args.mib, "runs": args.runs, "summary": summary,
          "ratios": ratios, "machine": machine()})
    table(f"nbdcopy of {args.mib} MiB (MB/s), 4 KiB writes at depth 16 (writes/s: qemu-img "
          "bench sequential, fio random)",
          [*summary.items(), *ratios.items()])


if __name__ == "__main__":
    main()
