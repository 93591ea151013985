"""Real redis-server processes for tests and benchmarks.

Each server listens on a free loopback port, keeps nothing on disk (no RDB, no AOF) and is
killed with SIGKILL when stopped, which is what a crashed storage server looks like. With
`RedisTls` it serves TLS only on that port (``--port 0 --tls-port``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

REDIS_SERVER = "redis-server"
START_TIMEOUT = 10.0
POLL_INTERVAL = 0.01
PORT_ATTEMPTS = 10

_running: set[RedisProcess] = set()


def redis_server_path() -> str | None:
    """Where redis-server is, None when it is not installed."""
    return shutil.which(REDIS_SERVER)


def free_port() -> int:
    """A loopback port nobody listens on right now (it may be taken before we bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config_args(extra: dict[str, Any]) -> list[str]:
    """``maxmemory_policy="noeviction"`` -> ``--maxmemory-policy noeviction``."""
    args: list[str] = []
    for name, value in extra.items():
        args.append("--" + name.replace("_", "-"))
        values: Iterable[Any] = value if isinstance(value, list | tuple) else [value]
        for item in values:
            if isinstance(item, bool):
                item = "yes" if item else "no"
            args.append(str(item))
    return args


@dataclass(frozen=True)
class RedisTls:
    """What a TLS-only redis-server presents and trusts; with a client certificate the server
    requires one (``tls-auth-clients yes``) and the fixture's probe and client present it."""

    cert: Path
    key: Path
    ca: Path
    client_cert: Path | None = None
    client_key: Path | None = None

    def args(self, port: int) -> list[str]:
        return ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(self.cert),
                "--tls-key-file", str(self.key), "--tls-ca-cert-file", str(self.ca),
                "--tls-auth-clients", "yes" if self.client_cert else "no"]

    def context(self) -> ssl.SSLContext:
        """The fixture's own client context (the start probe): the CA checked, not the host
        name, so that a test can serve a certificate made out to another name."""
        context = ssl.create_default_context(cafile=str(self.ca))
        context.check_hostname = False
        if self.client_cert is not None:
            context.load_cert_chain(str(self.client_cert),
                                    str(self.client_key) if self.client_key else None)
        return context


class RedisStartError(RuntimeError):
    """redis-server exited or did not answer in time."""

    def __init__(self, message: str, port_in_use: bool = False) -> None:
        super().__init__(message)
        self.port_in_use = port_in_use


class RedisProcess:
    """One redis-server process on 127.0.0.1; can be stopped and started again on its port."""

    host = "127.0.0.1"

    def __init__(self, port: int, directory: Path, extra_args: dict[str, Any] | None = None,
                 tls: RedisTls | None = None):
        self.port = port
        self.tls = tls
        self.directory = Path(directory)
        self.extra_args = dict(extra_args or {})
        self.log_path = self.directory / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"RedisProcess({self.address}, {state})"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        return [
            REDIS_SERVER,
            *(self.tls.args(self.port) if self.tls else ["--port", str(self.port)]),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--daemonize", "no",
            *_config_args(self.extra_args),
        ]  # fmt: skip

    def start(self) -> None:
        """Start (or restart) on the same port and directory; return once it answers PING."""
        if self.running:
            raise RuntimeError(f"redis-server {self.address} is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        _running.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        """Poll until this very process answers (another one may own the port)."""
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            code = self.process.poll()
            if code is not None:
                log = self._log_tail()
                raise RedisStartError(
                    f"redis-server {self.address} exited with code {code}:\n{log}",
                    port_in_use="Address already in use" in log,
                )
            if self._answers():
                return
            if time.monotonic() > deadline:
                raise RedisStartError(
                    f"redis-server {self.address} did not answer within {START_TIMEOUT} s:\n"
                    + self._log_tail()
                )
            time.sleep(POLL_INTERVAL)

    def _answers(self) -> bool:
        """True when our process (checked by pid) answers on the port.

        A raw socket, not redis-py: its clients retry with backoff, which would turn one
        failed probe into seconds.
        """
        assert self.process is not None
        password = self.extra_args.get("requirepass")
        auth = (b"AUTH %s\r\n" % str(password).encode()) if password else b""
        try:
            with self._probe_socket() as sock:
                sock.sendall(auth + b"INFO server\r\n")
                reply = b""
                size = -1  # bulk reply: $<size>\r\n<data>\r\n
                while size < 0 or len(reply) < size:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return False
                    reply += chunk
                    if auth and reply.startswith(b"+OK\r\n"):
                        reply = reply[5:]  # the AUTH's answer
                    if not reply:
                        continue
                    if not reply.startswith(b"$"):  # e.g. -LOADING
                        return False
                    header_end = reply.find(b"\r\n")
                    if size < 0 and header_end > 0:
                        size = header_end + 2 + int(reply[1:header_end]) + 2
        except OSError:  # refused, reset, timed out
            return False
        if f"process_id:{self.process.pid}\r\n".encode() not in reply:
            # Someone else listens there; our process will exit with "Address already in use".
            return False
        return True

    def _probe_socket(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=0.5)
        if self.tls is None:
            return sock
        try:
            return self.tls.context().wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise

    def stop(self) -> None:
        """Kill with SIGKILL (a crash, no shutdown save) and wait for the process to end."""
        process, self.process = self.process, None
        _running.discard(self)
        if process is None or process.poll() is not None:
            return
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)

    def client(self, db: int = 0) -> redis.Redis:
        """A synchronous client for checks from the test (raw bytes, no decoding)."""
        password = self.extra_args.get("requirepass")
        tls: dict[str, Any] = {}
        if self.tls is not None:
            tls = {"ssl": True, "ssl_ca_certs": str(self.tls.ca), "ssl_check_hostname": False,
                   "ssl_certfile": str(self.tls.client_cert) if self.tls.client_cert else None,
                   "ssl_keyfile": str(self.tls.client_key) if self.tls.client_key else None}
        return redis.Redis(
            host=self.host,
            port=self.port,
            db=db,
            password=str(password) if password else None,
            socket_timeout=5.0,
            socket_connect_timeout=5.0,
            retry=Retry(NoBackoff(), 0),  # fail at once when the server is down
            **tls,
        )


def start_redis(directory: Path, tls: RedisTls | None = None,
                **extra_args: Any) -> RedisProcess:
    """Start one redis-server on a free port (TLS only with ``tls``), trying another port if
    that one got taken."""
    if redis_server_path() is None:
        raise RedisStartError(f"{REDIS_SERVER} is not on PATH")
    last: RedisStartError | None = None
    for _ in range(PORT_ATTEMPTS):
        server = RedisProcess(free_port(), directory, extra_args, tls)
        try:
            server.start()
            return server
        except RedisStartError as exc:
            if not exc.port_in_use:
                raise
            last = exc
    raise RedisStartError(f"no free port after {PORT_ATTEMPTS} attempts: {last}")


class RedisFactory:
    """Starts servers on demand (each in its own directory) and kills them all at the end."""

    def __init__(self, base: Path) -> None:
        self.base = Path(base)
        self.servers: list[RedisProcess] = []

    def __call__(self, n: int = 1, tls: RedisTls | None = None,
                 **extra_args: Any) -> list[RedisProcess]:
        started = []
        for _ in range(n):
            directory = self.base / f"redis-{len(self.servers)}"
            server = start_redis(directory, tls, **extra_args)
            self.servers.append(server)
            started.append(server)
        return started

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


RedisFactoryFn = Callable[..., list[RedisProcess]]


@atexit.register
def _kill_leftovers() -> None:
    """Never leave a redis-server behind, even when the test run is interrupted."""
    for server in list(_running):
        server.stop()
