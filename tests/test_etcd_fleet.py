"""A fleet behind etcd without silent fallbacks (issue 29): a real etcd, real redis-servers,
real tlogserver processes and the real `tlog` command line.

A config source that defines no storage stops the server; a server id is registered on its
lease, so a second server with it refuses to start; `tlog config` never writes the servers'
lease keys, merges instead of dropping fields, keeps the log layout, exports what it
imports; the read tools take the fleet's etcd config; owner key churn does not reload the
config; an etcd outage longer than the lease gives the vdisks up, shows in the metrics and
logs one error line, not one per handshake.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml

from tlog.client import ThreadedClient
from tlog.protocol import Operation

from .etcd_fixture import EtcdProcess, etcd  # noqa: F401  (the fixture)
from .redis_fixture import RedisProcess
from .serverproc import ServerProcess, pick_port
from .test_cli_read import KEY, tlog_cli

WAIT = 30.0
ROOT = Path(__file__).resolve().parents[1]


def tlogserver(*args: str) -> subprocess.CompletedProcess[str]:
    """A tlogserver that is expected to refuse to start."""
    return subprocess.run([sys.executable, "-m", "tlogserver", "--address",
                           f"127.0.0.1:{pick_port()}", *args],
                          capture_output=True, text=True, timeout=60)


def fleet_server(store: EtcdProcess, *args: str, metrics: int | None = None) -> ServerProcess:
    extra = ["--metrics-address", f"127.0.0.1:{metrics}"] if metrics is not None else []
    return ServerProcess("--config", store.url(), "--priv-key", KEY, *extra, *args).start()


def write(server: ServerProcess, vdisk: str, count: int = 10, first: int = 0) -> None:
    with ThreadedClient([server.address], vdisk, None) as client:
        for i in range(first, first + count):
            client.send_next(Operation.SET, i, None, bytes([i % 251 + 1]) * 4096)
        client.wait_flushed(timeout=WAIT)


def metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


# ---------------------------------------------------------------------------------------------
# 5. The read tools on the fleet's etcd config


def test_a_new_operator_restores_a_fleet_vdisk_from_etcd(etcd: EtcdProcess,  # noqa: F811
                                                         redis6: list[RedisProcess],
                                                         tmp_path: Path) -> None:
    key = os.urandom(32)
    server_key = tmp_path / "server" / "master.key"  # where the servers have it
    server_key.parent.mkdir()
    server_key.write_bytes(key)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({
        "key_file": str(server_key), "flush_size": 10,
        "storage_clusters": {"main": {"servers": [r.address for r in redis6]}},
        "default_storage_cluster": "main"}))
    url = etcd.url()
    tlog_cli("config", "import", "--etcd", url, str(fleet))
    server = ServerProcess("--config", url).start()  # the key file from etcd too
    try:
        write(server, "vm-1", count=30)
    finally:
        server.kill()
    expected = b"".join(bytes([i % 251 + 1]) * 4096 for i in range(30))

    # The operator's machine: the etcd URL and a copy of the key file, somewhere else.
    copy = tmp_path / "operator" / "master.key"
    copy.parent.mkdir()
    copy.write_bytes(key)
    image = tmp_path / "vm-1.img"
    tlog_cli("restore", "--config", url, "--key-file", str(copy), "--vdisk", "vm-1",
             "-o", str(image))
    assert image.read_bytes() == expected
    assert "30 blocks" in tlog_cli("verify", "--config", url, "--key-file", str(copy),
                                   "--vdisk", "vm-1").stdout
    tlog_cli("inspect", "--config", url, "--key-file", str(copy), "--vdisk", "vm-1")
    # Without --key-file: the config's key file is a path on the servers.
    server_key.unlink()
    bad = tlog_cli("verify", "--config", url, "--vdisk", "vm-1", check=False)
    assert bad.returncode == 2 and "no such file here (a path on the servers)" in bad.stderr
    assert "--key-file" in bad.stderr

    # TLOG_CONFIG, as tlog config takes it, works for the readers too...
    env = {k: v for k, v in os.environ.items() if not k.startswith("TLOG_")}
    env["TLOG_CONFIG"] = url

    def tlog(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", "from tlog.cli import main; main()",
                               *args], capture_output=True, text=True, timeout=120, env=env)
    image.unlink()
    proc = tlog("restore", "--key-file", str(copy), "--vdisk", "vm-1", "-o", str(image))
    assert proc.returncode == 0, proc.stderr
    assert image.read_bytes() == expected
    # ...and beside --storage-addresses, which wins over the config's storage map.
    image.unlink()
    proc = tlog("restore", "--storage-addresses", ",".join(r.address for r in redis6),
                "--key-file", str(copy), "--vdisk", "vm-1", "-o", str(image))
    assert proc.returncode == 0, proc.stderr
    assert image.read_bytes() == expected
    # A prefix with nothing under it says so.
    bad = tlog_cli("verify", "--config", etcd.url("/tlgo"), "--key-file", str(copy),
                   "--vdisk", "vm-1", check=False)
    assert bad.returncode == 2 and "no configuration keys under /tlgo" in bad.stderr
