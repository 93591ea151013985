"""`tlog nbd --config SOURCE --server-id ID --socket-dir DIR`: serve every vdisk the config
assigns to this NBD server, each by a `tlog nbd` of its own (nbdkit with the plugin, in a
process of its own: one embedded interpreter per vdisk, so busy vdisks use the host's
cores and one failing vdisk touches no other), on ``DIR/<vdisk>.sock``.

The supervisor (asyncio) follows the config source: an etcd watch, or for a file SIGHUP
and its modification time. A vdisk added is started; a vdisk removed gets SIGTERM (nbdkit
then makes its final flush) and is waited for; a changed setting of a served vdisk is
refused with one line (the vdisk keeps its settings until it is removed and added again).
A vdisk whose process ends by itself is started again with backoff (its start converges
device and log). SIGTERM or SIGINT stop every vdisk the same way; the exit code is 0 when
each stopped cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tlog.configsource import (
    ConfigError,
    EtcdStore,
    EtcdUrl,
    is_etcd,
    is_lease_key,
    key_name,
    key_path,
    load_config,
)

from .hostconfig import changed_settings, child_arguments, host_vdisks
from .hostmetrics import serve_host_metrics
from .settings import NbdSettings

log = logging.getLogger("tlog.nbd.host")

#: Seconds between two looks at a config file's modification time.
FILE_POLL = 1.0
#: Seconds a vdisk's process may take to stop (its final flush) before it is killed.
STOP_TIMEOUT = 120.0
#: Backoff of restarts of a vdisk's process: first and longest pause; a run this long
#: resets it.
BACKOFF_FIRST, BACKOFF_MAX, BACKOFF_RESET = 1.0, 30.0, 60.0
#: The longest unix socket path (sun_path holds 108 bytes with its NUL).
MAX_SOCKET_PATH = 107
#: etcd changes arriving together are applied as one reload after this pause.
SETTLE = 0.05


_LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_the_supervisor() -> None:
    """In a vdisk's process, before exec: SIGTERM (its final flush) when the supervisor
    dies, even by SIGKILL, rather than a vdisk served on by nobody's child."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def free_port() -> int:
    """A free loopback TCP port for a vdisk's own /metrics (the supervisor's gathers it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Child:
    """One vdisk's `tlog nbd` process, kept running until stopped."""

    def __init__(self, host: Host, settings: NbdSettings) -> None:
        self.host = host
        self.vdisk = settings.vdisk
        self.settings = settings
        self.socket = str(Path(host.socket_dir) / f"{self.vdisk}.sock")
        self.state = "starting"  # starting, serving, waiting (backoff), stopping, stopped
        self.starts = 0
        self.metrics_port = 0
        self.refused: NbdSettings | None = None  # the last change refused (said once)
        self.exit_code: int | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._stop = asyncio.Event()
        self.task = asyncio.ensure_future(self._run())

    def argv(self) -> list[str]:
        argv = [self.host.python, "-c", "from tlog.cli import main; main()", "nbd",
                "--socket", self.socket, "--threads", str(self.host.threads),
                *child_arguments(self.settings)]
        if self.host.metrics:
            self.metrics_port = free_port()
            argv += ["--metrics-address", f"127.0.0.1:{self.metrics_port}"]
        return argv

    async def _run(self) -> None:
        try:
            await self._keep_running()
        except Exception:  # a bug here must not stop the other vdisks, nor the stop
            log.exception("vdisk %s: its supervision failed", self.vdisk)
            if self._process is not None and self._process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self._process.send_signal(signal.SIGTERM)
                self.exit_code = await self._process.wait()
        self.state = "stopped"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)

    async def _keep_running(self) -> None:
        delay = BACKOFF_FIRST
        while not self._stop.is_set():
            self.state, self.starts = "starting", self.starts + 1
            started = time.monotonic()
            # A session of its own: a terminal's Ctrl-C reaches the supervisor only, which
            # stops the vdisks one by one.
            self._process = await asyncio.create_subprocess_exec(
                *self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, start_new_session=True, limit=1 << 20,
                preexec_fn=_die_with_the_supervisor)
            log.info("vdisk %s: process %d on %s", self.vdisk, self._process.pid, self.socket)
            if self._stop.is_set():  # stopped while it was being started
                with contextlib.suppress(ProcessLookupError):
                    self._process.send_signal(signal.SIGTERM)
            await self._relay(self._process)
            code = self.exit_code = await self._process.wait()
            self._process = None
            if self._stop.is_set():
                break
            if time.monotonic() - started >= BACKOFF_RESET:
                delay = BACKOFF_FIRST
            self.state = "waiting"
            log.error("vdisk %s: its process ended (exit code %d); starting it again in "
                      "%.0f s", self.vdisk, code, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _relay(self, process: asyncio.subprocess.Process) -> None:
        """The vdisk's log lines, each prefixed with the vdisk, to our stderr."""
        assert process.stderr is not None
        async for raw in process.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            if "serving vdisk" in line and self.state == "starting":
                self.state = "serving"
            sys.stderr.write(f"[{self.vdisk}] {line}\n")
            sys.stderr.flush()

    async def stop(self) -> int | None:
        """SIGTERM (its final flush), waited for; killed after `STOP_TIMEOUT`. The exit
        code of its last process (None: none ran)."""
        self._stop.set()
        process = self._process
        if process is not None and process.returncode is None:
            self.state = "stopping"
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self.task), STOP_TIMEOUT)
            except TimeoutError:
                log.error("vdisk %s: not stopped within %.0f s: killed", self.vdisk,
                          STOP_TIMEOUT)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        await self.task
        return self.exit_code


class Host:
    """The supervisor: the config followed, a `Child` per vdisk assigned."""

    def __init__(self, source: str, server_id: str, socket_dir: str, *,
                 metrics_address: str = "", threads: int = 2,
                 python: str = sys.executable) -> None:
        self.source = source
        self.server_id = server_id
        self.socket_dir = socket_dir
        self.metrics = metrics_address
        self.threads = threads
        self.python = python
        self.children: dict[str, Child] = {}
        self.stopping: dict[str, asyncio.Task[int | None]] = {}
        #: vdisks added again while their old process still stops: started after it
        self.pending: dict[str, NbdSettings] = {}
        self.source_error = ""
        self._reload = asyncio.Event()
        self._done = asyncio.Event()
        self._later: set[asyncio.Future[None]] = set()

    # -- the config --
    def apply(self, data: Mapping[str, Any]) -> None:
        """Make the vdisks served those ``data`` assigns to this server: a config that does
        not check out is one line, and changes nothing."""
        try:
            wanted = host_vdisks(data, self.server_id)
        except ConfigError as exc:
            log.error("config rejected, the vdisks keep their settings: %s", exc)
            return
        for vdisk in [v for v in self.pending if v not in wanted]:
            del self.pending[vdisk]
        for vdisk in [v for v in self.children if v not in wanted]:
            gone = self.children.pop(vdisk)
            log.info("vdisk %s: removed from the config: stopping it (final flush)", vdisk)
            self.stopping[vdisk] = asyncio.ensure_future(self._retire(gone))
        for vdisk, settings in wanted.items():
            child = self.children.get(vdisk)
            if child is None:
                if vdisk in self.pending:
                    self.pending[vdisk] = settings
                else:
                    self._start(settings)
            elif settings != child.settings and settings != child.refused:
                child.refused = settings
                log.error("vdisk %s: change of %s refused: it cannot apply to a served vdisk "
                          "(remove the vdisk, then add it again); it keeps its settings",
                          vdisk, ", ".join(changed_settings(child.settings, settings)))
            elif settings == child.settings:
                child.refused = None

    def _start(self, settings: NbdSettings) -> None:
        vdisk = settings.vdisk
        path = Path(self.socket_dir) / f"{vdisk}.sock"
        if len(os.fsencode(str(path))) > MAX_SOCKET_PATH:
            log.error("vdisk %s: not served: its socket path %s is longer than %d bytes "
                      "(a shorter --socket-dir)", vdisk, path, MAX_SOCKET_PATH)
            return
        previous = self.stopping.get(vdisk)
        if previous is not None and not previous.done():
            # removed and added again at once: the new one starts once the old one stopped
            self.pending[vdisk] = settings

            async def later() -> None:
                await previous
                wanted = self.pending.pop(vdisk, None)
                if wanted is not None and not self._done.is_set():
                    self.children[vdisk] = Child(self, wanted)
            task = asyncio.ensure_future(later())
            self._later.add(task)  # a task nothing refers to may be collected
            task.add_done_callback(self._later.discard)
            return
        self.children[vdisk] = Child(self, settings)

    async def _retire(self, child: Child) -> int | None:
        code = await child.stop()
        log.info("vdisk %s: stopped (exit code %s)", child.vdisk, code)
        return code

    async def _follow_file(self) -> None:
        """SIGHUP, or a new modification time of the file: read it again."""
        def stamp() -> tuple[int, int, int] | None:
            try:
                info = os.stat(self.source)
            except OSError:
                return None
            return info.st_mtime_ns, info.st_size, info.st_ino
        seen = stamp()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reload.wait(), FILE_POLL)
            now = stamp()
            if not self._reload.is_set() and now == seen:
                continue
            self._reload.clear()
            seen = now
            try:
                data = load_config(self.source)
            except ConfigError as exc:
                log.error("config rejected, the vdisks keep their settings: %s", exc)
                continue
            self.apply(data)

    async def _follow_etcd(self) -> None:
        """An etcd watch of the prefix: each change of a configuration key, read it all
        again; while etcd cannot be reached, the vdisks are served as they are."""
        url = EtcdUrl.parse(self.source)
        store = EtcdStore(url)
        delay = 0.1
        try:
            while True:
                try:
                    client = await store.client()
                    watch = await client.watch_prefix(key_path(url.prefix, ""))
                    if self.source_error:
                        log.info("config source %s reachable again", url)
                        self.source_error = ""
                    await self._load_etcd(store)  # what changed while the watch was not set
                    delay = 0.1
                    async for event in watch:
                        name = key_name(url.prefix, bytes(event.kv.key))
                        if name is not None and is_lease_key(name):
                            continue
                        await asyncio.sleep(SETTLE)
                        await self._load_etcd(store)
                    raise ConnectionError("the watch ended")
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # etcd gone: keep serving what is served
                    if not self.source_error:
                        log.error("config source %s unreachable, the vdisks are served as "
                                  "they are: %s", url, exc)
                    self.source_error = str(exc) or type(exc).__name__
                    await store.drop()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        finally:
            await store.close()

    async def _load_etcd(self, store: EtcdStore) -> None:
        try:
            data = await store.load()
        except ConfigError as exc:
            if "unreachable" in str(exc):
                raise
            log.error("config rejected, the vdisks keep their settings: %s", exc)
            return
        self.apply(data)

    # -- the whole --
    async def run(self, first: Mapping[str, Any]) -> int:
        """Serve ``first`` (the config as read at start), follow the source until SIGTERM
        or SIGINT, stop every vdisk; 0 when each stopped cleanly."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        if self.metrics:
            # read from the metrics thread: a copy of the list, plain attributes
            serve_host_metrics(self.metrics, lambda: list(self.children.values()),
                               lambda: not self.source_error)
            log.info("metrics on http://%s/metrics", self.metrics)
        self.apply(first)
        if not self.children:
            log.warning("no vdisks assigned to NBD server %s in %s (yet): waiting for the "
                        "config to assign some", self.server_id, self.source)
        follow = asyncio.ensure_future(self._follow_etcd() if is_etcd(self.source)
                                       else self._follow_file())
        await stop.wait()
        log.info("stopping %d vdisk(s)", len(self.children))
        self._done.set()
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow
        for vdisk, child in self.children.items():
            self.stopping[vdisk] = asyncio.ensure_future(self._retire(child))
        codes = await asyncio.gather(*self.stopping.values())
        bad = [c for c in codes if c not in (0, None)]
        log.info("stopped%s", f"; {len(bad)} vdisk(s) not cleanly" if bad else " cleanly")
        return 1 if bad else 0


def serve_host(source: str, server_id: str, socket_dir: str, *, metrics_address: str,
               threads: int) -> int:
    """Read the config once (a bad one: ConfigError, one line), then supervise."""
    first = load_config(source)
    host_vdisks(first, server_id)  # checked before anything starts
    os.makedirs(socket_dir, exist_ok=True)
    host = Host(source, server_id, socket_dir, metrics_address=metrics_address,
                threads=threads)
    return asyncio.run(host.run(first))
