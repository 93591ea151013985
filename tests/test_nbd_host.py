"""`tlog nbd --config`: every vdisk a fleet's config assigns to an NBD server, each in an
nbdkit of its own, following the config (a YAML file; etcd) — real nbdkit, nbdcopy and
qemu-io, a real tlogserver on six real redis-servers, a real etcd, and `tlog restore`
giving back each served image byte for byte.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from .etcd_fixture import EtcdProcess, etcd  # noqa: F401  (the fixture)
from .redis_fixture import RedisFactory, RedisProcess
from .serverproc import ServerProcess, pick_port
from .test_cli_read import KEY, WAIT, start_tlogserver, tlog_cli
from .test_nbd import NbdServer, pytestmark, qemu_io, restore  # noqa: F401  (the skip)

MiB = 1 << 20
SIZE = 4 * MiB


class HostServer(NbdServer):
    """`tlog nbd --config SOURCE --server-id ID --socket-dir DIR` in a subprocess."""

    def __init__(self, source: str, server_id: str, sockets: Path, *extra: str) -> None:
        self.sockets = sockets
        self.socket = ""
        self.uri = ""
        self._start("--config", source, "--server-id", server_id, "--socket-dir",
                    str(sockets), *extra)

    def __enter__(self) -> HostServer:
        return self

    def vdisk_uri(self, vdisk: str) -> str:
        """The vdisk's NBD URI: its own socket (the export name is its id too)."""
        return f"nbd+unix:///{vdisk}?socket={self.sockets / (vdisk + '.sock')}"

    def serving(self, *vdisks: str, after: str | None = None) -> None:
        for vdisk in vdisks:
            self.wait_for(f"serving vdisk {vdisk}:", after=after)

    def pid(self, vdisk: str) -> int:
        line = self.wait_for(f"vdisk {vdisk}: process ")
        found = re.search(r"process (\d+)", line)
        assert found, line
        return int(found.group(1))


def host_config(server: ServerProcess, vdisks: dict[str, dict[str, Any]],
                tmp_path: Path) -> dict[str, Any]:
    """An NBD server entry: the tlogserver as default, file images under tmp_path."""
    return {"tlogservers": [server.address], "size": "4M", "backend": "file",
            "image": str(tmp_path / "{vdisk}.img"), "vdisks": vdisks}


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    """Written whole and renamed: the watcher never reads half a file."""
    part = path.with_suffix(".part")
    part.write_text(yaml.safe_dump(data))
    os.replace(part, path)


def copies(targets: dict[str, str], tmp_path: Path) -> tuple[dict[str, bytes],
                                                             list[subprocess.Popen[str]]]:
    """nbdcopy of new random data into each URI, all at once (started, not waited)."""
    data, procs = {}, []
    for vdisk, uri in targets.items():
        blob = os.urandom(SIZE)
        source = tmp_path / f"data-{vdisk}-{time.monotonic_ns()}.bin"
        source.write_bytes(blob)
        data[vdisk] = blob
        procs.append(subprocess.Popen(["nbdcopy", str(source), uri], stderr=subprocess.PIPE,
                                      text=True))
    return data, procs


def finish(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        _, err = proc.communicate(timeout=WAIT * 4)
        assert proc.returncode == 0, err


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as answer:
        return str(answer.read().decode())


def metric(text: str, name: str, vdisk: str) -> float:
    found = re.search(rf'^{name}{{[^}}]*vdisk="{vdisk}"[^}}]*}} (\S+)$', text, re.M)
    assert found, f"{name} of {vdisk} not in {text}"
    return float(found.group(1))


def test_a_hosts_vdisks_from_a_yaml_file_added_removed_killed_and_restarted(
        redis6: list[RedisProcess], tmp_path: Path) -> None:
    config, sockets = tmp_path / "nbd.yaml", tmp_path / "sockets"
    port = pick_port()
    with start_tlogserver(redis6, KEY) as server:
        def assign(vdisks: dict[str, dict[str, Any]]) -> None:
            write_yaml(config, {"nbd_servers": {"host-a": host_config(server, vdisks,
                                                                        tmp_path)}})
        assign({"v1": {}, "v2": {}, "v3": {}})
        with HostServer(str(config), "host-a", sockets, "--metrics-address",
                        f"127.0.0.1:{port}") as host:
            host.serving("v1", "v2", "v3")
            served, procs = copies({v: host.vdisk_uri(v) for v in ("v1", "v2", "v3")},
                                   tmp_path)
            finish(procs)
            # While v2 and v3 are written: v4 added, v1 removed (drained: its final flush).
            second, procs = copies({v: host.vdisk_uri(v) for v in ("v2", "v3")}, tmp_path)
            assign({"v2": {}, "v3": {}, "v4": {}})
            host.serving("v4")
            host.wait_for("vdisk v1: stopped (exit code 0)")
            finish(procs)
            served.update(second)
            fourth, procs = copies({"v4": host.vdisk_uri("v4")}, tmp_path)
            finish(procs)
            served.update(fourth)
            assert not (sockets / "v1.sock").exists()
            # A setting that cannot change under a served vdisk: refused, one line.
            assign({"v2": {"size": "8M"}, "v3": {}, "v4": {}})
            host.wait_for("vdisk v2: change of size refused")
            qemu_io(host.vdisk_uri("v3"), "flush")  # (nbdcopy flushes only with --flush)
            text = scrape(port)
            assert metric(text, "tlog_nbd_vdisk_up", "v2") == 1
            assert metric(text, "tlog_nbd_written_bytes_total", "v2") >= 2 * SIZE
            assert metric(text, "tlog_nbd_flush_seconds_count", "v3") >= 1
            assert 'vdisk="v1"' not in text
            # v3's process killed mid-write: started again, its start converges it.
            qemu_io(host.vdisk_uri("v3"), "write -P 0x5a 8192 65536")
            os.kill(host.pid("v3"), signal.SIGKILL)
            host.wait_for("vdisk v3: its process ended (exit code -9)")
            host.wait_for("vdisk v3: recovered after an unclean stop",
                          after="vdisk v3: its process ended")
            host.serving("v3", after="vdisk v3: its process ended")
            qemu_io(host.vdisk_uri("v3"), "write -P 0x6b 0 4096", "flush")
            assert host.stop() == 0
        assert "tlog nbd: INFO tlog.nbd.host: stopped cleanly" in host.lines
        after_kill = bytearray(served["v3"])
        after_kill[8192:8192 + 65536] = b"\x5a" * 65536
        after_kill[0:4096] = b"\x6b" * 4096
        served["v3"] = bytes(after_kill)
        for vdisk, blob in served.items():
            image = (tmp_path / f"{vdisk}.img").read_bytes()
            assert image == blob, vdisk
            assert restore(redis6, vdisk, tmp_path / f"{vdisk}.restored", SIZE) == image
        assign({"v2": {}, "v3": {}, "v4": {}})
        # Started again: every vdisk converges (each stopped cleanly: no recovery needed).
        with HostServer(str(config), "host-a", sockets) as host:
            host.serving("v2", "v3", "v4")
            for vdisk in ("v2", "v3", "v4"):
                host.wait_for(f"vdisk {vdisk}: clean start, device and log agree")
            assert host.stop() == 0


def test_a_hosts_vdisks_from_etcd_one_backend_killed(
        etcd: EtcdProcess, redis6: list[RedisProcess],  # noqa: F811
        redis_factory: RedisFactory, tmp_path: Path) -> None:
    (store,) = redis_factory(1)
    sockets = tmp_path / "sockets"
    with start_tlogserver(redis6, KEY) as server:
        entry = host_config(server, {"r1": {"backend": "redis", "redis": store.address},
                                     "f1": {}, "f2": {}}, tmp_path)
        exported = tmp_path / "fleet.yaml"
        exported.write_text(yaml.safe_dump({"nbd_servers": {"host-b": entry}}))
        tlog_cli("config", "import", "--etcd", etcd.url(), str(exported))
        # tlog config checks the NBD servers' entries as the supervisor does.
        bad = tlog_cli("config", "put", "--etcd", etcd.url(), "nbd_servers/host-c",
                       "vdisks: {f1: {size: 3000, image: /x}}", check=False)
        assert bad.returncode != 0 and "f1: size: 3000 is not a multiple" in bad.stderr
        with HostServer(etcd.url(), "host-b", sockets) as host:
            host.serving("r1", "f1", "f2")
            served, procs = copies({v: host.vdisk_uri(v) for v in ("r1", "f1", "f2")},
                                   tmp_path)
            finish(procs)
            store.stop()  # r1's block store is gone: its requests fail, no one else's
            failed = qemu_io(host.vdisk_uri("r1"), "write -P 0x11 0 4096", "flush",
                             check=False)
            assert "Input/output error" in failed.stdout + failed.stderr, failed
            more, procs = copies({v: host.vdisk_uri(v) for v in ("f1", "f2")}, tmp_path)
            # A vdisk added in etcd is served within seconds, while the others are written.
            entry["vdisks"]["f3"] = {}
            tlog_cli("config", "put", "--etcd", etcd.url(), "nbd_servers/host-b",
                     yaml.safe_dump(entry))
            host.serving("f3")
            finish(procs)
            served.update(more)
            third, procs = copies({"f3": host.vdisk_uri("f3")}, tmp_path)
            finish(procs)
            served.update(third)
            code = host.stop()
        assert code == 0, host.log
    for vdisk in ("f1", "f2", "f3"):
        image = (tmp_path / f"{vdisk}.img").read_bytes()
        assert image == served[vdisk], vdisk
        assert restore(redis6, vdisk, tmp_path / f"{vdisk}.restored", SIZE) == image


@pytest.mark.parametrize("content, message", [
    ({"nbd_servers": {"h": {"vdisks": {"v": {"size": "4M"}}}}},
     "nbd_servers: h: vdisks: v: server: at least one tlogserver"),
    ({"nbd_servers": {"h": {"vdisks": {"v": {"sise": "4M"}}}}},
     "nbd_servers: h: vdisks: v: unknown key(s) sise"),
    ({"nbd_servers": {"h": {"tlogservers": ["127.0.0.1:1"], "vdisks": {"a/b": {}}}}},
     "'a/b' cannot name a socket"),
    ({"nbd_servers": {"h": {"tlogservers": ["127.0.0.1:1"], "image": "/i/{vdisk}",
                            "size": "1M", "vdisks": {"v": {}}},
                      "g": {"tlogservers": ["127.0.0.1:1"], "image": "/j/{vdisk}",
                            "size": "1M", "vdisks": {"v": {}}}}},
     "vdisk v is served by both g and h"),
    ({"nbd_servers": {"h": {"tlogservers": ["127.0.0.1:1"], "backend": "redis",
                            "vdisks": {"v": {"size": "1M"}}}}},
     "v: redis: the block store's address is needed"),
])
def test_a_bad_config_is_one_line(tmp_path: Path, content: dict[str, Any],
                                  message: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(content))
    proc = tlog_cli("nbd", "--config", str(config), "--server-id", "h", "--socket-dir",
                    str(tmp_path / "s"), check=False)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_config_mode_takes_no_per_vdisk_flags(tmp_path: Path) -> None:
    proc = tlog_cli("nbd", "--config", str(tmp_path / "c.yaml"), "--socket-dir",
                    str(tmp_path), "--size", "4M", check=False)
    assert proc.returncode == 2 and "--size: with --config" in proc.stderr, proc.stderr
