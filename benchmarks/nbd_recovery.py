"""How long `tlog nbd` takes to start on a large sparse image left dirty by a crash, against
a clean start of the same image (docs/nbd.md, "After a crash").

The image is ``--size`` (1 TiB by default, sparse) with ``--regions`` regions of 4 MiB spread
over it holding random data; its state is left as a crash leaves it: not clean, those blocks
marked (a crash of the process: the marked blocks are looked at), or with another boot's id
(a crash of the machine: whole regions). One tlogserver on 6 redis-servers (k=4, m=2).
Prints one JSON line per run, then medians.

    .venv/bin/python benchmarks/nbd_recovery.py --runs 3
"""

from __future__ import annotations

import argparse
import os
import re
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
from tlog.nbd.backend import default_state_path  # noqa: E402
from tlog.nbd.intent import REGION_BYTES, ExportState, FileIntentLog, boot_id  # noqa: E402
from tlog.units import parse_size  # noqa: E402

BLOCK = 4096


def dirty_image(image: Path, size: int, regions: int, machine_crash: bool, vdisk: str) -> int:
    """A sparse image with ``regions`` regions of random data, its state as a crash leaves
    it; the bytes of data written."""
    with image.open("wb") as stream:
        stream.truncate(size)
        step = size // regions
        for i in range(regions):
            stream.seek(i * step)
            stream.write(os.urandom(REGION_BYTES))
    intent = FileIntentLog(default_state_path(str(image)), BLOCK, size)
    state = ExportState(vdisk, BLOCK, size, clean=False,
                        boot_id="another boot" if machine_crash else boot_id())
    intent.save(state)
    for i in range(regions):
        intent.mark(i * step // BLOCK, REGION_BYTES // BLOCK)
    intent.close()
    return regions * REGION_BYTES


def start_seconds(server: TlogServer, vdisk: str, image: Path, sock: Path) -> tuple[float, str]:
    """Seconds from `tlog nbd` starting to the export answering; its recovery line."""
    started = time.perf_counter()
    proc = subprocess.Popen(tlog_command("nbd", "--vdisk", vdisk, "--server", server.address,
                                         "--image", str(image), "--socket", str(sock)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = ""
    try:
        assert proc.stderr is not None
        for text in proc.stderr:
            if "recovered after" in text:
                line = text.strip()
            if "serving vdisk" in text:
                return time.perf_counter() - started, line
        raise RuntimeError(f"tlog nbd exited with {proc.wait()}")
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1T", help="the image's size (sparse)")
    parser.add_argument("--regions", type=int, default=8, help="4 MiB regions of data left "
                        "dirty (8: 32 MiB)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = parse_size(args.size)
    runs = []
    with scratch_dir("tlogbench-recovery") as tmp, RedisPool(6) as redis:
        for run in range(args.runs):
            result: dict[str, object] = {"benchmark": "nbd_recovery", "run": run,
                                         "size": args.size,
                                         "dirty_mib": args.regions * REGION_BYTES >> 20}
            for kind, machine_crash in (("process", False), ("machine", True)):
                redis.flush_all()
                vdisk = f"rec-{kind}-{run}"
                image, sock = tmp / f"{vdisk}.img", tmp / f"{vdisk}.sock"
                dirty_image(image, size, args.regions, machine_crash, vdisk)
                with TlogServer(*storage_args(redis.addresses)) as server:
                    seconds, line = start_seconds(server, vdisk, image, sock)
                    found = re.search(r"looked at (\d+) block", line)
                    result[f"{kind}_crash_start_s"] = round(seconds, 2)
                    result[f"{kind}_crash_blocks"] = int(found.group(1)) if found else 0
                    clean, _ = start_seconds(server, vdisk, image, sock)
                    result[f"{kind}_clean_start_s"] = round(clean, 2)
                image.unlink()
                Path(default_state_path(str(image))).unlink()
            emit(result)
            runs.append(result)
    keys = [k for k in runs[0] if k.endswith("_s")]
    summary = summarize(runs, keys)
    emit({"benchmark": "nbd_recovery", "size": args.size, "runs": args.runs,
          "summary": summary, "machine": machine()})
    table(f"tlog nbd start on a {args.size} sparse image, {args.regions * 4} MiB dirty "
          "(seconds to serving)", list(summary.items()))


if __name__ == "__main__":
    main()
