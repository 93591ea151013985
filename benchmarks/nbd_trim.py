"""What a whole-device trim, and a `mkfs.ext4`, cost through `tlog nbd` (issue 30).

Each run: a fresh tlogserver on 6 redis-servers (k=4, m=2) and `tlog nbd` (file backend)
on a new sparse image of ``--size`` (4 GiB). The trim: ``qemu-io`` discards the whole
device in requests of ``--request`` (1 GiB), then FLUSHes (after one block written and
flushed, so that the servers' connections exist); reported are the seconds of the trim,
the entries of the log (from `tlog restore`'s summary: the one write, the trim's) and the
growth of the six servers' ``used_memory`` over the trim. The mkfs (``--mkfs-size``, 64
GiB; ``nbdfuse``, from libnbd-bin, shows the export as a file): `mkfs.ext4` on a fresh
export, its seconds to the end of its final sync, and the log entries it made. One JSON
line per run, then medians.

    .venv/bin/python benchmarks/nbd_trim.py --runs 3
"""

from __future__ import annotations

import argparse
import re
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
from tlog.units import parse_size  # noqa: E402

KEY = "12345678901234567890123456789012"  # benchmarks.common.storage_args' key


def used_memory(redis: RedisPool) -> int:
    total = 0
    for port in redis.ports:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"*2\r\n$4\r\nINFO\r\n$6\r\nmemory\r\n")
            data = b""
            while b"used_memory:" not in data or not data.endswith(b"\r\n"):
                data += s.recv(65536)
        total += int(re.search(rb"used_memory:(\d+)", data).group(1))  # type: ignore[union-attr]
    return total


class Export:
    """`tlog nbd` serving a new sparse image, until the block ends (SIGTERM)."""

    def __init__(self, server: TlogServer, vdisk: str, image: Path, size: int) -> None:
        self.sock = image.with_suffix(".sock")
        self.uri = f"nbd+unix:///?socket={self.sock}"
        self.proc = subprocess.Popen(
            tlog_command("nbd", "--vdisk", vdisk, "--server", server.address, "--image",
                         str(image), "--size", str(size), "--socket", str(self.sock)),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def __enter__(self) -> Export:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if b"serving vdisk" in line:
                return self
        raise RuntimeError(f"tlog nbd exited with {self.proc.wait()}")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=300)


def log_entries(redis: RedisPool, vdisk: str, out: Path) -> dict[str, int]:
    """The entries of the vdisk's log by kind, from a restore of it."""
    proc = subprocess.run(tlog_command("restore", "--vdisk", vdisk, "--storage-addresses",
                                       ",".join(redis.addresses), "--priv-key", KEY,
                                       "--output", str(out)),
                          capture_output=True, text=True, timeout=600, check=True)
    found = re.search(r"(\d+) blocks \((\d+) set, (\d+) deleted(?:, (\d+) range deletes)?",
                      proc.stdout)
    assert found, proc.stdout
    out.unlink()
    return {"entries": int(found.group(1)), "sets": int(found.group(2)),
            "deletes": int(found.group(3)), "range_deletes": int(found.group(4) or 0)}


def trim(redis: RedisPool, tmp: Path, run: int, size: int, request: int) -> dict[str, object]:
    redis.flush_all()
    vdisk = f"trim{run}"
    image = tmp / f"{vdisk}.img"
    with TlogServer(*storage_args(redis.addresses)) as server, \
            Export(server, vdisk, image, size) as export:
        # One write stored first: the servers' connections and the vdisk's keys exist
        # before the figure is taken, so it is what the trim adds.
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4096", "-c", "flush",
                        export.uri], check=True, capture_output=True, timeout=120)
        before = used_memory(redis)
        commands = [f"discard {at} {min(request, size - at)}"
                    for at in range(0, size, request)] + ["flush"]
        argv = ["qemu-io", "-f", "raw"]
        for command in commands:
            argv += ["-c", command]
        started = time.perf_counter()
        subprocess.run([*argv, export.uri], check=True, capture_output=True, timeout=3600)
        seconds = time.perf_counter() - started
        grown = used_memory(redis) - before
    entries = log_entries(redis, vdisk, tmp / "restored.img")
    image.unlink()
    return {"trim_s": round(seconds, 3), "trim_log_entries": entries["entries"],
            "trim_redis_growth_kib": round(grown / 1024, 1)}


def mkfs(redis: RedisPool, tmp: Path, run: int, size: int) -> dict[str, object]:
    redis.flush_all()
    vdisk = f"mkfs{run}"
    image, mount = tmp / f"{vdisk}.img", tmp / f"{vdisk}.mnt"
    mount.mkdir()
    with TlogServer(*storage_args(redis.addresses)) as server, \
            Export(server, vdisk, image, size) as export:
        fuse = subprocess.Popen(["nbdfuse", str(mount), "--unix", str(export.sock)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            device = mount / "nbd"
            deadline = time.monotonic() + 30
            while not device.exists():
                if fuse.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("nbdfuse did not show the export")
                time.sleep(0.05)
            started = time.perf_counter()
            subprocess.run(["mkfs.ext4", "-F", "-q", str(device)], check=True, timeout=3600)
            seconds = time.perf_counter() - started
        finally:
            subprocess.run(["umount", str(mount)], check=False)
            fuse.wait(timeout=60)
    entries = log_entries(redis, vdisk, tmp / "restored.img")
    image.unlink()
    mount.rmdir()
    return {"mkfs_s": round(seconds, 3), "mkfs_log_entries": entries["entries"],
            "mkfs_range_deletes": entries["range_deletes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="4G", help="the trimmed vdisk's size")
    parser.add_argument("--request", default="1G", help="bytes per discard request")
    parser.add_argument("--mkfs-size", default="64G", help="the mkfs'd vdisk's size (0: none)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if not all(shutil.which(t) for t in ("nbdkit", "qemu-io")):
        raise SystemExit("nbdkit and qemu-io are needed (make nbd installs them)")
    size, request = parse_size(args.size), parse_size(args.request)
    mkfs_size = parse_size(args.mkfs_size)
    if mkfs_size and not all(shutil.which(t) for t in ("nbdfuse", "mkfs.ext4")):
        print("nbdfuse or mkfs.ext4 missing: no mkfs figures", file=sys.stderr)
        mkfs_size = 0
    runs = []
    with scratch_dir("tlogbench-trim") as tmp, RedisPool(6) as redis:
        for run in range(args.runs):
            result: dict[str, object] = {"benchmark": "nbd_trim", "run": run,
                                         "size": args.size, "request": args.request}
            result.update(trim(redis, tmp, run, size, request))
            if mkfs_size:
                result.update(mkfs(redis, tmp, run, mkfs_size))
            emit(result)
            runs.append(result)
    keys = [k for k, v in runs[0].items() if k.endswith(("_s", "_kib", "_entries", "_deletes"))
            and isinstance(v, (int, float))]
    summary = summarize(runs, keys)
    emit({"benchmark": "nbd_trim", "size": args.size, "mkfs_size": args.mkfs_size,
          "runs": args.runs, "summary": summary, "machine": machine()})
    table(f"whole-device trim of {args.size} in {args.request} requests, and mkfs.ext4 on "
          f"{args.mkfs_size}, through tlog nbd", list(summary.items()))


if __name__ == "__main__":
    main()
