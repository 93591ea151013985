"""tlogserver --config etcd://...: a real etcd process holding the configuration, a real
tlogserver subprocess watching it, real redis-servers storing what the clients write."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tlog.client import InternalServerError, InvalidVdiskIDError, ThreadedClient
from tlog.protocol import Operation

from .etcd_fixture import EtcdProcess, etcd  # noqa: F401  (the fixture)
from .redis_fixture import RedisProcess
from .serverproc import ServerProcess, pick_port
from .test_cli_read import KEY, tlog_cli

WAIT = 30.0


def put_yaml(store: EtcdProcess, key: str, value: object) -> None:
    store.put(f"/tlog/{key}", yaml.safe_dump(value))


def clusters(store: EtcdProcess, redis6: list[RedisProcess]) -> None:
    """Cluster a: db 0 of the six servers; cluster b: db 1 of the same ones."""
    for name, db in (("a", 0), ("b", 1)):
        put_yaml(store, f"clusters/{name}", {"servers": [f"{r.address}@{db}" for r in redis6]})


def start(store: EtcdProcess, metrics: int | None = None) -> ServerProcess:
    args = ["--config", store.url(), "--priv-key", KEY]
    if metrics is not None:
        args += ["--metrics-address", f"127.0.0.1:{metrics}"]
    return ServerProcess(*args).start()


def write(server: ServerProcess, vdisk: str, count: int = 10) -> None:
    with ThreadedClient([server.address], vdisk, None) as client:
        for i in range(count):
            client.send_next(Operation.SET, i, None, bytes([i]) * 4096)
        client.wait_flushed(timeout=WAIT)


def stored_in(redis6: list[RedisProcess], vdisk: str) -> list[int]:
    """The dbs whose first server holds the vdisk's last-hash list."""
    return [db for db in (0, 1) if redis6[0].client(db).exists(f"last_hash_{vdisk}")]


def readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_until(condition, what: str, timeout: float = WAIT) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_config_from_etcd_with_watched_changes(etcd: EtcdProcess,  # noqa: F811
                                               redis6: list[RedisProcess]) -> None:
    clusters(etcd, redis6)
    put_yaml(etcd, "server", {"flush_size": 5})
    put_yaml(etcd, "vdisks/vd1", {"storage_cluster": "a"})
    server = start(etcd)
    try:
        server.wait_for_log(r"flush-size 5")  # a server option from etcd
        write(server, "vd1")
        assert stored_in(redis6, "vd1") == [0]
        with pytest.raises(InvalidVdiskIDError):
            write(server, "vd2")  # not in the map yet

        put_yaml(etcd, "vdisks/vd2", {"storage_cluster": "b"})  # watched: applies at once
        server.wait_for_log("config reloaded")
        write(server, "vd2")
        assert stored_in(redis6, "vd2") == [1]

        # Invalid values are logged and ignored: the running config stays.
        put_yaml(etcd, "vdisks/vd3", {"storage_cluster": "nope"})
        server.wait_for_log("config reload rejected.*vdisks.vd3.storage_cluster: unknown "
                            "storage cluster 'nope'")
        etcd.put("/tlog/vdisks/vd4", "[: not yaml")
        server.wait_for_log("config reload rejected.*vdisks/vd4: not valid YAML")
        write(server, "vd2", 20)
        with pytest.raises(InvalidVdiskIDError):
            write(server, "vd3")
        etcd.delete("/tlog/vdisks/vd3")
        etcd.delete("/tlog/vdisks/vd4")
        put_yaml(etcd, "default_storage_cluster", "b")
        wait_until(lambda: server.output(current_run=True).count("config reloaded") >= 2,
                   "the reload after the fixes")
        write(server, "vd5")  # the default cluster
        assert stored_in(redis6, "vd5") == [1]
        # A clean stop: drained, exit 0, and no task left behind with an unseen error.
        assert server.terminate() == 0
        output = server.output(current_run=True)
        assert "never retrieved" not in output and "Traceback" not in output, output
    finally:
        server.kill()


def test_etcd_down_keeps_the_last_good_config_and_readyz_says_so(
        etcd: EtcdProcess, redis6: list[RedisProcess]) -> None:  # noqa: F811
    clusters(etcd, redis6)
    put_yaml(etcd, "vdisks/vd1", {"storage_cluster": "a"})
    put_yaml(etcd, "vdisks/vd9", {"storage_cluster": "a"})
    port = pick_port()
    server = start(etcd, metrics=port)
    try:
        wait_until(lambda: readyz(port)[0] == 200, "ready")
        with ThreadedClient([server.address], "vd1", None) as client:
            etcd.stop()
            wait_until(lambda: readyz(port)[0] == 503, "not ready")
            assert "config source unreachable" in readyz(port)[1]
            server.wait_for_log("config source .* unreachable, keeping the running config")
            # The open vdisk is served on (its lease outlives a short outage)...
            for i in range(10):
                client.send_next(Operation.SET, i, None, bytes([i]) * 4096)
            client.wait_flushed(timeout=WAIT)
        assert stored_in(redis6, "vd1") == [0]
        # ...but no vdisk is taken on while its ownership cannot be claimed (transient).
        with pytest.raises((InternalServerError, ConnectionError), match="INTERNAL_SERVER"):
            ThreadedClient([server.address], "vd9", None, connect_timeout=2)
        etcd.start()
        server.wait_for_log("reachable again")
        wait_until(lambda: readyz(port)[0] == 200, "ready again")
        put_yaml(etcd, "vdisks/vd2", {"storage_cluster": "b"})
        wait_until(lambda: server.output(current_run=True).count("config reloaded") >= 2,
                   "a change after the restart")
        write(server, "vd2")
        assert stored_in(redis6, "vd2") == [1]
    finally:
        server.kill()


def test_etcd_errors_at_start_are_one_clear_line(etcd: EtcdProcess,  # noqa: F811
                                                 tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tlogserver", "--address",
                               "127.0.0.1:0", "--priv-key", KEY, *args],
                              capture_output=True, text=True, timeout=60)

    etcd.put("/tlog/clusters/a", "servers: [127.0.0.1:1]")  # fewer than k+m servers
    proc = run("--config", etcd.url())
    assert proc.returncode != 0 and "storage_clusters.a" in proc.stderr, proc.stderr
    etcd.put("/tlog/typo", "1")
    proc = run("--config", etcd.url())
    assert proc.returncode != 0 and "etcd key /tlog/typo: unknown key" in proc.stderr
    proc = run("--config", f"etcd://127.0.0.1:{pick_port()}/tlog")
    assert proc.returncode != 0 and "etcd unreachable" in proc.stderr, proc.stderr
    proc = run("--config", f"etcd://{etcd.address}")
    assert proc.returncode != 0 and "needs a key prefix" in proc.stderr


def test_tlog_config_checks_before_it_writes(etcd: EtcdProcess,  # noqa: F811
                                             tmp_path: Path) -> None:
    servers = [f"127.0.0.1:{6400 + i}" for i in range(6)]
    config = tmp_path / "tlogserver.yaml"
    config.write_text(yaml.safe_dump({
        "flush_size": 50, "storage_clusters": {"a": {"servers": servers}},
        "vdisks": {"vd1": {"storage_cluster": "a"}}}))
    url = etcd.url()
    out = tlog_cli("config", "import", "--etcd", url, str(config)).stdout
    assert "3 key(s) written" in out
    assert yaml.safe_load(etcd.get("/tlog/vdisks/vd1") or b"") == {"storage_cluster": "a"}
    assert tlog_cli("config", "get", "--etcd", url, "server").stdout.strip() == "flush_size: 50"
    assert "3 key(s), valid" in tlog_cli("config", "check", "--etcd", url).stdout

    bad = tlog_cli("config", "put", "--etcd", url, "vdisks/vd2", "storage_cluster: nope",
                   check=False)
    assert bad.returncode == 1 and "unknown storage cluster 'nope'" in bad.stderr
    assert etcd.get("/tlog/vdisks/vd2") is None  # not written
    bad = tlog_cli("config", "put", "--etcd", url, "server", "flush_size: many", check=False)
    assert bad.returncode == 1 and "flush_size: expected a whole number" in bad.stderr
    bad = tlog_cli("config", "delete", "--etcd", url, "clusters/a", check=False)
    assert bad.returncode == 1 and "storage_clusters: missing" in bad.stderr
    tlog_cli("config", "put", "--etcd", url, "vdisks/vd2", "storage_cluster: a")
    assert etcd.get("/tlog/vdisks/vd2") == b"storage_cluster: a"
