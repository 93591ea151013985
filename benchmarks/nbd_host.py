"""`tlog nbd --config`: two busy vdisks at once against one alone (issue 33's bar: at least
1.5 times as fast together on the 2-core machine).

6 redis (k=4, m=2); a tlogserver for both vdisks, or with ``--tlogservers 2`` one each (the
NBD side alone: in a fleet the tlogservers run elsewhere); one `tlog nbd --config` serving
vdisks a and b, a process each. Per run: ``--mib`` MiB of random data nbdcopied into a
alone, then into a and b at the same time (the pair's throughput: both copies' bytes over
the time until both ended), then the same pair with both vdisk processes pinned to one
core (``taskset -a -c 0``): approximately the one-interpreter alternative, whose GIL lets
one process serving both use about one core. And the cores used while copying alone: by
the vdisk's process, by the first tlogserver, by everything of the run
(``run_cores_alone``: vdisk, tlogservers, redis, nbdcopy) and by the whole machine (other
work included): with N cores free, two copies go at most N / run_cores_alone times as fast
as one. One JSON line per run, then medians.

    .venv/bin/python benchmarks/nbd_host.py --mib 64 --runs 3 [--tlogservers 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RedisPool,
    TlogServer,
    busy_seconds,
    children_cpu,
    cpu_seconds,
    emit,
    load_average,
    machine,
    scratch_dir,
    storage_args,
    summarize,
    table,
    tlog_command,
)


class Host:
    """`tlog nbd --config` serving vdisks a and b; the pid of each vdisk's process."""

    def __init__(self, tmp: Path, servers: list[TlogServer], mib: int) -> None:
        config = tmp / "nbd.yaml"
        config.write_text(yaml.safe_dump({"nbd_servers": {"bench": {
            "size": f"{mib}M", "image": str(tmp / "{vdisk}.img"), "vdisks": {
                "a": {"tlogservers": [servers[0].address]},
                "b": {"tlogservers": [servers[-1].address]}}}}}))
        self.sockets = tmp / "sockets"
        self.proc = subprocess.Popen(
            tlog_command("nbd", "--config", str(config), "--server-id", "bench",
                         "--socket-dir", str(self.sockets)),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.pids: dict[str, int] = {}
        serving: set[str] = set()
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                found = re.search(r"vdisk (\w+): process (\d+)", line)
                if found:
                    self.pids[found.group(1)] = int(found.group(2))
                found = re.search(r"serving vdisk (\w+):", line)
                if found:
                    serving.add(found.group(1))
                    if serving >= {"a", "b"}:
                        ready.set()
        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120):
            self.stop()
            raise RuntimeError("the vdisks were not served within 120 s")

    def uri(self, vdisk: str) -> str:
        return f"nbd+unix:///{vdisk}?socket={self.sockets / (vdisk + '.sock')}"

    def pin(self, cpus: str) -> None:
        """Every thread of both vdisk processes onto ``cpus`` (taskset's list)."""
        for pid in self.pids.values():
            subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], check=True,
                           stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=300)


def copy(host: Host, data: Path, vdisks: tuple[str, ...]) -> float:
    """Seconds until nbdcopy of ``data`` into each of ``vdisks`` (all at once) ended."""
    start = time.monotonic()
    procs = [subprocess.Popen(["nbdcopy", str(data), host.uri(v)]) for v in vdisks]
    for proc in procs:
        if proc.wait(timeout=600) != 0:
            raise RuntimeError(f"nbdcopy failed: {proc.args}")
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tlogservers", type=int, choices=(1, 2), default=1,
                        help="one tlogserver for both vdisks, or one each")
    args = parser.parse_args()
    if not all(shutil.which(t) for t in ("nbdkit", "nbdcopy", "taskset")):
        raise SystemExit("nbdkit, nbdcopy and taskset are needed (make nbd installs them)")
    size = args.mib << 20
    cores = f"0-{(os.cpu_count() or 1) - 1}"
    runs = []
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(scratch_dir("tlogbench-nbd-host"))
        redis = stack.enter_context(RedisPool(6))
        servers = [stack.enter_context(TlogServer(*storage_args(redis.addresses)))
                   for _ in range(args.tlogservers)]
        data = tmp / "random.bin"
        data.write_bytes(os.urandom(size))
        host = Host(tmp, servers, args.mib)
        try:
            for run in range(args.runs):
                host.pin(cores)
                cpu, busy = cpu_seconds(host.pids["a"]), busy_seconds()
                ours = sum(s.cpu_seconds() for s in servers) + redis.cpu_seconds() + \
                    children_cpu()
                logging = servers[0].cpu_seconds()
                alone = copy(host, data, ("a",))
                cores_used = (cpu_seconds(host.pids["a"]) - cpu) / alone
                machine_used = (busy_seconds() - busy) / alone
                logging = (servers[0].cpu_seconds() - logging) / alone
                ours = (sum(s.cpu_seconds() for s in servers) + redis.cpu_seconds()
                        + children_cpu() - ours) / alone + cores_used
                pair = copy(host, data, ("a", "b"))
                host.pin("0")
                pinned = copy(host, data, ("a", "b"))
                one = size / alone / 1e6
                result = {"benchmark": "nbd_host", "run": run, "mib": args.mib,
                          "one_vdisk_mb_per_s": round(one, 1),
                          "two_vdisks_mb_per_s": round(2 * size / pair / 1e6, 1),
                          "two_vdisks_ratio": round(alone * 2 / pair, 2),
                          "two_on_one_core_mb_per_s": round(2 * size / pinned / 1e6, 1),
                          "two_on_one_core_ratio": round(alone * 2 / pinned, 2),
                          "vdisk_process_cores_alone": round(cores_used, 2),
                          "tlogserver_cores_alone": round(logging, 2),
                          "run_cores_alone": round(ours, 2),
                          "machine_cores_alone": round(machine_used, 2),
                          "load_average": load_average()}
                emit(result)
                runs.append(result)
        finally:
            host.stop()
    keys = [k for k in runs[0] if k not in ("benchmark", "run", "mib", "load_average")]
    summary = summarize(runs, keys)
    emit({"benchmark": "nbd_host", "mib": args.mib, "runs": args.runs,
          "tlogservers": args.tlogservers, "summary": summary,
          "machine": machine()})
    table(f"nbdcopy of {args.mib} MiB of random data into one vdisk, and into two at once "
          "(a process each; and both pinned to one core)", list(summary.items()))


if __name__ == "__main__":
    main()
