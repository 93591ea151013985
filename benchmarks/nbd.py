"""`tlog nbd` against nbdkit's plain file plugin: nbdcopy of random data into each export.

Each run starts a fresh tlogserver on 6 redis (k=4, m=2), serves a new image through
`tlog nbd` on a unix socket and copies ``--mib`` MiB of random data into it with nbdcopy
(which flushes at the end: every block is then stored in the log), then does the same
with ``nbdkit file`` for the ceiling of the machine. Prints one JSON line per run and a
summary of MB/s, medians over ``--runs``.

    .venv/bin/python benchmarks/nbd.py --mib 64 --runs 3
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if not shutil.which("nbdkit") or not shutil.which("nbdcopy"):
        raise SystemExit("nbdkit and nbdcopy are needed (make nbd installs them)")
    size = args.mib * 1024 * 1024
    runs = []
    with scratch_dir("tlogbench-nbd") as tmp, RedisPool(6) as redis:
        data = tmp / "data.bin"
        data.write_bytes(os.urandom(size))
        for run in range(args.runs):
            redis.flush_all()
            with TlogServer(*storage_args(redis.addresses)) as server:
                image, sock = tmp / f"tlog{run}.img", tmp / f"tlog{run}.sock"
                tlog_s = copy_into(
                    tlog_command("nbd", "--vdisk", f"bench{run}", "--server", server.address,
                                 "--image", str(image), "--size", str(size), "--socket",
                                 str(sock)), sock, data, b"serving vdisk")
                image.unlink()
            image, sock = tmp / f"file{run}.img", tmp / f"file{run}.sock"
            image.write_bytes(b"")
            os.truncate(image, size)
            file_s = copy_into(["nbdkit", "--foreground", "--unix", str(sock), "file",
                                str(image)], sock, data, None)
            image.unlink()
            result = {"benchmark": "nbd", "run": run, "mib": args.mib,
                      "tlog_nbd_mb_per_s": round(size / tlog_s / 1e6, 1),
                      "nbdkit_file_mb_per_s": round(size / file_s / 1e6, 1)}
            emit(result)
            runs.append(result)
    summary = summarize(runs, ["tlog_nbd_mb_per_s", "nbdkit_file_mb_per_s"])
    emit({"benchmark": "nbd", "mib": args.mib, "runs": args.runs, "summary": summary,
          "machine": machine()})
    table(f"nbdcopy of {args.mib} MiB of random data (MB/s)",
          [(k, v) for k, v in summary.items()])


if __name__ == "__main__":
    main()
