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

import asyncio
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aetcd
import yaml

from tlog.client import ThreadedClient
from tlog.protocol import Operation
from tlog.protocol.status import HandshakeStatus

from .etcd_fixture import EtcdProcess, etcd  # noqa: F401  (the fixture)
from .redis_fixture import RedisProcess
from .serverproc import ServerProcess, config_free_env, pick_port
from .test_cli_read import KEY, tlog_cli
from .test_etcd_config import clusters, put_yaml, readyz, wait_until
from .wireclient import WireClient

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
# 1. A config source that defines no storage


def test_a_config_source_without_storage_refuses_to_start(etcd: EtcdProcess,  # noqa: F811
                                                          tmp_path: Path) -> None:
    # A typo in the prefix: nothing under it.
    proc = tlogserver("--config", etcd.url("/tlgo"), "--priv-key", KEY)
    assert proc.returncode == 2, proc.stderr
    assert "no configuration keys under /tlgo (is the prefix right?)" in proc.stderr
    assert "Traceback" not in proc.stderr
    check = tlog_cli("config", "check", "--etcd", etcd.url("/tlgo"), check=False)
    assert check.returncode == 1 and "no configuration keys under /tlgo" in check.stderr

    # Options, but no storage.
    put_yaml(etcd, "server", {"flush_size": 5})
    proc = tlogserver("--config", etcd.url(), "--priv-key", KEY)
    assert proc.returncode == 2 and "it defines no storage" in proc.stderr, proc.stderr
    check = tlog_cli("config", "check", "--etcd", etcd.url())
    assert "1 key(s), valid" in check.stdout and "defines no storage" in check.stdout

    # The same for a YAML file.
    path = tmp_path / "tlog.yaml"
    path.write_text("flush_size: 5\n")
    proc = tlogserver("--config", str(path), "--priv-key", KEY)
    assert proc.returncode == 2 and "it defines no storage" in proc.stderr, proc.stderr

    # Asked for, in-memory storage is still there.
    with ServerProcess("--config", etcd.url(), "--memory-storage") as server:
        server.wait_for_log("storage: in-memory")


# ---------------------------------------------------------------------------------------------
# 2. A repeated server id


def test_a_server_id_in_use_refuses_to_start(etcd: EtcdProcess,  # noqa: F811
                                             redis6: list[RedisProcess]) -> None:
    clusters(etcd, redis6)
    put_yaml(etcd, "default_storage_cluster", "a")
    first = fleet_server(etcd, "--server-id", "srv-x", "--owner-lease-ttl", "2")
    try:
        write(first, "vd1")
        registered = yaml.safe_load(etcd.get("/tlog/servers/srv-x") or b"")
        assert registered["address"] == first.address and registered["pid"] == first.pid

        started = time.monotonic()
        proc = tlogserver("--config", etcd.url(), "--priv-key", KEY, "--server-id", "srv-x",
                          "--owner-lease-ttl", "2")
        assert proc.returncode == 2, proc.stderr
        assert "server id srv-x is in use by a live server" in proc.stderr
        assert time.monotonic() - started < 15
        assert yaml.safe_load(etcd.get("/tlog/servers/srv-x") or b"")["pid"] == first.pid
        write(first, "vd1", first=10)  # the first one never noticed

        # The shared server key cannot give every server the same id.
        bad = tlog_cli("config", "put", "--etcd", etcd.url(), "server", "server_id: srv-x",
                       check=False)
        assert bad.returncode == 1 and "server_id: each server's own" in bad.stderr
        assert etcd.get("/tlog/server") is None
    finally:
        first.kill()

    # A crashed run's registration on this host is taken over at once, though its lease
    # has 30 s to run, and its vdisks with it.
    again = fleet_server(etcd, "--server-id", "srv-z", "--owner-lease-ttl", "30")
    try:
        write(again, "vd3")
        again.kill()
        started = time.monotonic()
        again.start()
        write(again, "vd3", first=10)
        assert time.monotonic() - started < 15
        assert yaml.safe_load(etcd.get("/tlog/servers/srv-z") or b"")["pid"] == again.pid
        again.wait_for_log("server id srv-z: taking over the registration of a previous run")
    finally:
        again.kill()


def test_a_registration_left_on_another_host_is_taken_once_its_lease_expires(
        etcd: EtcdProcess, redis6: list[RedisProcess]) -> None:  # noqa: F811
    clusters(etcd, redis6)
    put_yaml(etcd, "default_storage_cluster", "a")

    async def left_behind() -> None:  # a server elsewhere that died: its lease runs out
        host, port = etcd.address.split(":")
        async with aetcd.Client(host=host, port=int(port), timeout=5) as client:
            lease = await client.lease(3)
            await client.put(b"/tlog/servers/srv-y", yaml.safe_dump(
                {"address": "10.9.9.9:11211", "host": "elsewhere", "pid": 1}).encode(),
                lease=lease)
    asyncio.run(left_behind())
    started = time.monotonic()
    server = fleet_server(etcd, "--server-id", "srv-y")
    try:
        server.wait_for_log("server id srv-y is registered by 10.9.9.9:11211 on elsewhere")
        assert 1 < time.monotonic() - started < 15
        write(server, "vd1")
    finally:
        server.kill()


# ---------------------------------------------------------------------------------------------
# 3. The servers' own keys


def test_tlog_config_never_writes_the_servers_lease_keys(etcd: EtcdProcess,  # noqa: F811
                                                         redis6: list[RedisProcess],
                                                         tmp_path: Path) -> None:
    clusters(etcd, redis6)
    put_yaml(etcd, "default_storage_cluster", "a")
    server = fleet_server(etcd, "--server-id", "srv-a")
    try:
        with ThreadedClient([server.address], "vd1", None) as client:
            client.send_next(Operation.SET, 0, None, b"\1" * 4096)
            client.wait_flushed(timeout=WAIT)
            url = etcd.url()
            for args in (["put", "owners/vd1", "other:1"], ["delete", "owners/vd1"],
                         ["put", "servers/srv-b", "address: x:1"], ["delete", "servers/srv-a"]):
                bad = tlog_cli("config", args[0], "--etcd", url, *args[1:], check=False)
                assert bad.returncode == 2, (args, bad.stdout, bad.stderr)
                assert "a server's own key, on its lease" in bad.stderr
            assert etcd.get("/tlog/owners/vd1") == b"srv-a"
            assert etcd.get("/tlog/servers/srv-b") is None
            # An import that prunes leaves them alone too, and so does an export.
            exported = tmp_path / "fleet.yaml"
            tlog_cli("config", "export", "--etcd", url, str(exported))
            assert "owners" not in exported.read_text() and "srv-a" not in exported.read_text()
            tlog_cli("config", "import", "--etcd", url, "--prune", str(exported))
            assert etcd.get("/tlog/owners/vd1") == b"srv-a"
            assert etcd.get("/tlog/servers/srv-a") is not None
            # They are there to read.
            owners = yaml.safe_load(tlog_cli("config", "owners", "--etcd", url).stdout)
            assert owners["owners"] == {"vd1": "srv-a"}
            assert owners["servers"]["srv-a"]["address"] == server.address
            client.send_next(Operation.SET, 1, None, b"\2" * 4096)
            client.wait_flushed(timeout=WAIT)
    finally:
        server.kill()


# ---------------------------------------------------------------------------------------------
# 4. put merges; the log layout stays; get, export and import


def test_tlog_config_put_merges_and_keeps_the_log_layout(etcd: EtcdProcess,  # noqa: F811
                                                         tmp_path: Path) -> None:
    servers = [f"127.0.0.1:{6400 + i}" for i in range(6)]
    path = tmp_path / "tlogserver.yaml"
    path.write_text(yaml.safe_dump({
        "flush_size": 25, "flush_time": 10, "k": 4, "m": 2,
        "storage_clusters": {"a": {"servers": servers}},
        "vdisks": {"vd1": {"storage_cluster": "a"}}}))
    url = etcd.url()
    tlog_cli("config", "import", "--etcd", url, str(path))

    def server_key() -> dict[str, object]:
        return yaml.safe_load(etcd.get("/tlog/server") or b"")

    # A value that drops fields is refused...
    bad = tlog_cli("config", "put", "--etcd", url, "server", "flush_size: 50", check=False)
    assert bad.returncode == 2 and "would drop flush_time, k, m" in bad.stderr, bad.stderr
    assert server_key()["flush_size"] == 25
    # ...--merge sets only the fields given...
    out = tlog_cli("config", "put", "--etcd", url, "server", "flush_size: 50", "--merge").stdout
    assert server_key() == {"flush_size": 50, "flush_time": 10, "k": 4, "m": 2}
    assert "flush_size 25 -> 50 (at once)" in out
    # ...and --replace replaces it all (k and m keep their values: the defaults).
    tlog_cli("config", "put", "--etcd", url, "server", "flush_size: 40", "--replace")
    assert server_key() == {"flush_size": 40}

    # What a live log is written with does not change: k, m, block size, format.
    bad = tlog_cli("config", "put", "--etcd", url, "server", "--merge",
                   "block_size: 512\nstorage_format: legacy", check=False)
    assert bad.returncode == 1, bad.stderr
    assert "block_size 4096 -> 512, storage_format 'v3' -> 'legacy': refused" in bad.stderr
    assert "a live log cannot change it" in bad.stderr
    # ...but v3 and v2 records are read alike: a log goes on from one to the other.
    out = tlog_cli("config", "put", "--etcd", url, "server", "storage_format: v2",
                   "--merge").stdout
    assert "storage_format 'v3' -> 'v2' (after each server's restart)" in out
    tlog_cli("config", "put", "--etcd", url, "server", "flush_size: 40", "--replace")
    (tmp_path / "k3.yaml").write_text(yaml.safe_dump({"k": 3, "m": 3}))
    bad = tlog_cli("config", "import", "--etcd", url, str(tmp_path / "k3.yaml"), check=False)
    assert bad.returncode == 1 and "k 4 -> 3, m 2 -> 3: refused" in bad.stderr, bad.stderr
    assert server_key() == {"flush_size": 40}
    # A restart-only setting is written, and said to be one.
    out = tlog_cli("config", "put", "--etcd", url, "server", "max_message_size: 8000000",
                   "--merge").stdout
    assert re.search(r"max_message_size \d+ -> 8000000 \(after each server's restart\)", out)

    # get prints YAML that loads.
    listing = yaml.safe_load(tlog_cli("config", "get", "--etcd", url).stdout)
    assert listing["server"]["flush_size"] == 40
    assert listing["clusters/a"] == {"servers": servers}
    assert listing["vdisks/vd1"] == {"storage_cluster": "a"}


def test_export_is_what_import_takes_back_and_import_says_what_it_keeps(
        etcd: EtcdProcess, tmp_path: Path) -> None:  # noqa: F811
    servers = [f"127.0.0.1:{6400 + i}" for i in range(6)]
    url = etcd.url()
    put_yaml(etcd, "server", {"flush_size": 30, "access": "token"})
    put_yaml(etcd, "clusters/a", {"servers": servers})
    put_yaml(etcd, "vdisks/vd1", {"storage_cluster": "a"})
    put_yaml(etcd, "vdisks/vd2", {"storage_cluster": "a", "access": "plain"})
    put_yaml(etcd, "default_storage_cluster", "a")
    exported = tmp_path / "fleet.yaml"
    tlog_cli("config", "export", "--etcd", url, str(exported))
    assert exported.stat().st_mode & 0o077 == 0  # it may hold secrets

    # Into another prefix, and out again: the same.
    other = etcd.url("/copy")
    assert "5 key(s) written" in tlog_cli("config", "import", "--etcd", other,
                                          str(exported)).stdout
    again = tlog_cli("config", "export", "--etcd", other).stdout
    assert yaml.safe_load(again) == yaml.safe_load(exported.read_text())

    # A file without vd2: the import says it keeps it, --prune deletes it.
    data = yaml.safe_load(exported.read_text())
    del data["vdisks"]["vd2"]
    exported.write_text(yaml.safe_dump(data))
    out = tlog_cli("config", "import", "--etcd", url, str(exported)).stdout
    assert "kept 1 key(s) not in the file: vdisks/vd2 (--prune deletes them)" in out
    assert etcd.get("/tlog/vdisks/vd2") is not None
    out = tlog_cli("config", "import", "--etcd", url, "--prune", "--dry-run",
                   str(exported)).stdout
    assert "would delete 1 key(s) not in the file: vdisks/vd2" in out
    assert etcd.get("/tlog/vdisks/vd2") is not None
    out = tlog_cli("config", "import", "--etcd", url, "--prune", str(exported)).stdout
    assert "deleted 1 key(s) not in the file: vdisks/vd2" in out
    assert etcd.get("/tlog/vdisks/vd2") is None


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
    env = config_free_env()
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


# ---------------------------------------------------------------------------------------------
# 6. What an operator watches


def test_owner_keys_do_not_reload_the_config(etcd: EtcdProcess,  # noqa: F811
                                             redis6: list[RedisProcess]) -> None:
    clusters(etcd, redis6)
    put_yaml(etcd, "vdisks/vd1", {"storage_cluster": "a"})
    server = fleet_server(etcd)
    try:
        write(server, "vd1")  # its owner key written
        for i in range(5):  # other servers claiming and releasing vdisks
            etcd.put(f"/tlog/owners/other{i}", "elsewhere:1")
            etcd.delete(f"/tlog/owners/other{i}")
        put_yaml(etcd, "vdisks/vd2", {"storage_cluster": "b"})
        server.wait_for_log("config reloaded")
        write(server, "vd2")
        output = server.output(current_run=True)
        assert output.count("config reloaded") == 1, output
        assert "nothing changed" not in output
    finally:
        server.kill()


def test_an_etcd_outage_longer_than_the_lease(etcd: EtcdProcess,  # noqa: F811
                                              redis6: list[RedisProcess]) -> None:
    clusters(etcd, redis6)
    put_yaml(etcd, "default_storage_cluster", "a")
    port = pick_port()
    server = fleet_server(etcd, "--owner-lease-ttl", "2", metrics=port)
    try:
        assert metric(port, "tlog_config_source_up") == 1
        assert metric(port, "tlog_ownership_lease_held") == 1
        with ThreadedClient([server.address], "vd1", None) as client:
            client.send_next(Operation.SET, 0, None, b"\1" * 4096)
            client.wait_flushed(timeout=WAIT)
            assert metric(port, "tlog_vdisks_owned") == 1
            etcd.stop()
            wait_until(lambda: metric(port, "tlog_config_source_up") == 0, "source down")
            # The lease is not renewed for its TTL: the open vdisk is given up.
            server.wait_for_log(r"ownership lease not renewed for 2 s.*giving up 1 vdisk\(s\)"
                                r": vd1", timeout=WAIT)
            assert metric(port, "tlog_ownership_lease_held") == 0
            assert metric(port, "tlog_ownership_leases_lost_total") == 1
            assert readyz(port)[0] == 503

            # Handshakes retried meanwhile are refused, with one error line for them all.
            async def handshakes() -> list[int]:
                statuses = []
                for _ in range(6):
                    c = await WireClient.connect(server.port, vdisk="vd2")
                    statuses.append(c.handshake.status)
                    await c.close()
                return statuses
            assert set(asyncio.run(handshakes())) == {HandshakeStatus.INTERNAL_SERVER_ERROR}
            errors = [line for line in server.output(current_run=True).splitlines()
                      if " ERROR " in line and ("claim" in line or "open the vdisk" in line)]
            assert len(errors) == 1, errors

            etcd.start()
            wait_until(lambda: metric(port, "tlog_ownership_lease_held") == 1, "lease again")
            wait_until(lambda: metric(port, "tlog_config_source_up") == 1, "source up")
            # The client reconnects and claims its vdisk again.
            client.send_next(Operation.SET, 1, None, b"\2" * 4096)
            client.wait_flushed(timeout=WAIT)
        server.wait_for_log(r"vdisks can be claimed again \(\d+ handshake\(s\) refused")
        write(server, "vd2")
    finally:
        server.kill()
    # Each metric shown here is in the operator's documentation.
    docs = (ROOT / "docs" / "operations.md").read_text()
    for name in ("tlog_config_source_up", "tlog_ownership_lease_held",
                 "tlog_ownership_leases_lost_total", "tlog_vdisks_owned"):
        assert f"`{name}`" in docs, name
