"""The benchmark scripts run, with tiny sizes, and print the JSON they promise: so that
`make bench` does not rot between the times someone runs it. Figures are not checked
(benchmarks measure; tests check behaviour), only that they are there."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .redis_fixture import redis_server_path

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(redis_server_path() is None,
                                reason="redis-server is not on PATH (make redis installs it)")


def bench(script: str, *args: str, timeout: float = 120) -> list[dict[str, Any]]:
    """Run ``benchmarks/<script>``; the JSON objects it printed."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    objects = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert objects, proc.stdout
    return objects


def summary(objects: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [o for o in objects if all(o.get(k) == v for k, v in match.items())]
    assert len(found) == 1, objects
    return found[0]


def test_micro() -> None:
    (result,) = bench("micro.py", "--runs", "1", "--scale", "0.02")
    for key in ("frame_decode_us_per_block", "seal_v2_us_per_25", "erasure_encode_us_per_25",
                "store_1_agg_redis_us", "store_8_aggs_memory_us", "record_hash_us_per_25",
                "block_hash_check_us_per_25", "image_apply_us_per_25"):
        assert result[key] > 0, key


def test_ingest_full_and_half_speed() -> None:
    objects = bench("ingest.py", "--runs", "1", "--blocks", "600", "--flush-sizes", "25",
                    "--data", "random")
    full = summary(objects, summary=True, speed="full")
    half = summary(objects, summary=True, speed="half")
    assert half["rate"] > 0 and full["rate"] is None
    for s in (full, half):
        figures = s["figures"]
        for key in ("blocks_per_second", "server_cpu_us_per_block", "client_cpu_us_per_block",
                    "recv_ok_p99_ms", "flush_ok_p99_ms"):
            assert set(figures[key]) == {"median", "min", "max"}, key
    runs = [o for o in objects if o.get("speed") and "run" in o]
    assert len(runs) == 2 and all(r["resends"] == 0 for r in runs)


@pytest.mark.parametrize("fill", ["send", "direct"])
def test_restore(fill: str) -> None:
    objects = bench("restore.py", "--runs", "1", "--blocks", "300", "--fill", fill,
                    *(["--scatter"] if fill == "direct" else []))
    run = objects[0]
    assert run["image_bytes"] > 0 and run["reported_mb_per_s"] > 0
    final = objects[-1]
    assert final["blocks"] == 300 and "command_mb_per_s" in final["summary"]


def test_server_ingest_one_block_per_write() -> None:
    *runs, final = bench("server_ingest.py", "--runs", "1", "--blocks", "1000",
                         "--write-per-block", "--rate", "20000")
    assert runs[0]["blocks"] == 1000 and runs[0]["server_cpu_us_per_block"] > 0
    assert final["write_per_block"] is True and final["rate"] == 20000
    assert set(final["summary"]["server_cpu_us_per_block"]) == {"median", "min", "max"}


def test_server_path() -> None:
    run, final = bench("server_path.py", "--runs", "1", "--blocks", "2000")
    assert run["cpu_us_per_block"] > 0 and run["blocks_per_s"] > 0
    assert final["blocks"] == 2000 and set(final["cpu_us_per_block"]) == {"median", "min", "max"}
    assert final["modules"].startswith("per-block modules")


def test_compact() -> None:
    run, final = bench("compact.py", "--runs", "1", "--blocks", "2000", "--indexes", "300",
                       "--keep", "500")
    assert run["redis_mb_after"] < run["redis_mb_before"]
    assert "compacted vdisk" in run["summary"] and "from the checkpoint" in run["restore_after"]
    assert final["benchmark"] == "compact" and "compact_seconds" in final["summary"]


def test_memory() -> None:
    idle, flood, _ = bench("memory.py", "--vdisks", "5", "--flood-blocks", "300",
                           "--server-arg=--max-buffered-blocks=100")
    assert idle["vdisks"] == 5 and idle["rss_connected_mib"] > 0
    # the window holds 100 blocks: the rest of the flood is refused, and all kept drain
    assert flood["recv_ok"] == 100 and flood["recv_failed"] == 200
    assert flood["flush_ok"] == 101 and flood["drain_seconds"] is not None


def test_run_all_quick_writes_one_report(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick",
                    "--only", "micro", "--output", str(out)], check=True, capture_output=True,
                   timeout=120, cwd=ROOT)
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["machine"]["cores"] >= 1
    assert report["benchmarks"]["micro"][0]["benchmark"] == "micro"


@pytest.mark.skipif(not all(shutil.which(t) for t in ("nbdkit", "nbdcopy", "qemu-img")),
                    reason="nbdkit, nbdcopy or qemu-img missing (make nbd installs them)")
def test_nbd() -> None:
    objects = bench("nbd.py", "--runs", "1", "--mib", "2", "--writes", "200",
                    "--fio-seconds", "1")
    result = summary(objects, runs=1)
    jobs = ["random_mb_per_s", "compressible_mb_per_s", "4k_writes_per_s"]
    if shutil.which("fio"):
        jobs.append("4k_random_writes_per_s")
    assert set(result["summary"]) == {f"{kind}_{job}" for kind in ("tlog", "file")
                                      for job in jobs}
    assert set(result["ratios"]) == {f"{job}_ratio_to_file" for job in jobs}


def test_nbd_recovery() -> None:
    objects = bench("nbd_recovery.py", "--runs", "1", "--size", "1G", "--regions", "2")
    result = summary(objects, runs=1)
    assert set(result["summary"]) == {f"{kind}_{when}_start_s" for kind in ("process",
                                                                             "machine")
                                      for when in ("crash", "clean")}
    assert objects[0]["process_crash_blocks"] == objects[0]["machine_crash_blocks"] == 2048


def test_intent_cost() -> None:
    objects = bench("intent_cost.py", "--runs", "1", "--size", "64M", "--marks", "2000")
    result = summary(objects, runs=1)
    assert set(result["summary"]) == {"mark_random_4k_us", "mark_seq_256k_us", "checkpoint_ms",
                                      "region_mark_ms", "image_sync_64m_ms"}
    assert all(v["median"] > 0 for v in result["summary"].values())


def test_loop_stall() -> None:
    *runs, final = bench("loop_stall.py", "--runs", "1", "--flush-blocks", "100",
                         "--flush-size", "10", "--compact-blocks", "2000", "--indexes", "300")
    assert final["runs"] == 1
    for case in ("flush", "compact_64k", "compact_4k"):
        assert runs[0][case]["wakeups"] > 0, case
        assert set(final["summary"][case]["max_ms"]) == {"median", "min", "max"}, case
        assert "control_p99_ms" in runs[0][case] and "cpu_max_ms" in runs[0][case], case

