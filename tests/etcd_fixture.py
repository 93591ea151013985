"""A real etcd process on free loopback ports with its own data directory, for tests."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aetcd
import pytest

from .serverproc import pick_port

START_TIMEOUT = 30.0


class EtcdProcess:
    """One single-member etcd cluster; `stop` kills it (-9), `start` brings it back with
    its data on the same ports."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = pick_port()
        self.peer_port = pick_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, prefix: str = "/tlog") -> str:
        return f"etcd://{self.address}{prefix}"

    def start(self) -> EtcdProcess:
        client = f"http://127.0.0.1:{self.port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory / "etcd.log", "ab")  # noqa: SIM115  (the process keeps it)
        self.process = subprocess.Popen(
            ["etcd", "--name", "t", "--data-dir", str(self.directory / "data"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"t={peer}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=2) as resp:
                    if json.loads(resp.read()).get("health") in ("true", True):
                        return self
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"etcd did not start: "
                                   f"{(self.directory / 'etcd.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def put(self, key: str, value: str) -> None:
        asyncio.run(self._call(lambda c: c.put(key.encode(), value.encode())))

    def delete(self, key: str) -> None:
        asyncio.run(self._call(lambda c: c.delete(key.encode())))

    def get(self, key: str) -> bytes | None:
        found = asyncio.run(self._call(lambda c: c.get(key.encode())))
        return None if found is None else bytes(found.value)

    async def _call(self, op):  # type: ignore[no-untyped-def]
        host, port = self.address.split(":")
        async with aetcd.Client(host=host, port=int(port), timeout=5) as client:
            return await op(client)


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdProcess]:
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not on PATH (make etcd installs it)")
    server = EtcdProcess(tmp_path / "etcd").start()
    try:
        yield server
    finally:
        server.stop()
