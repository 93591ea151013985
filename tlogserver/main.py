"""The daemon's life: a `TlogServer` run until SIGTERM/SIGINT (then drained), its config
reloaded on SIGHUP, and, with an etcd config, the fleet joined and the keys watched."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable
from typing import Any

from .config import ServerConfig
from .etcdsource import EtcdSource
from .fleet import join_fleet
from .server import TlogServer
from .tasks import cancel_and_wait

log = logging.getLogger("tlogserver")


def freeze_heap() -> None:
    """Leave what the process holds once started (imported modules, config: some 60,000
    objects) out of the garbage collector's full passes, which would otherwise go through
    all of it on the event loop, 20 ms and more each (`gc.freeze`); what is allocated
    later is collected as before."""
    gc.collect()
    gc.freeze()


async def run(config: ServerConfig, ready: asyncio.Event | None = None,
              reload: Callable[[], ServerConfig] | None = None, *,
              source: EtcdSource | None = None,
              rebuild: Callable[[dict[str, Any]], ServerConfig] | None = None) -> int:
    """Run until SIGTERM/SIGINT, then drain; returns the exit code.

    SIGHUP builds the config again with ``reload`` (the file re-read, the same flags) and
    applies what can change while running. With an etcd ``source``, every change of its
    keys is applied so (``rebuild`` turns what it holds into a config), and SIGHUP reads
    them again.
    """
    server = TlogServer(config)
    server.config_source = source
    if source is not None:
        try:
            server.ownership = await join_fleet(source, config, server.ownership_lost)
        except BaseException:  # ServerIdInUse: another server has this id; etcd gone
            await server.factory.close()
            await source.close()
            raise
    if source is not None and rebuild is not None:
        def apply(data: dict[str, Any]) -> None:
            server.reload_from(lambda: rebuild(data))
        watcher = asyncio.get_running_loop().create_task(
            source.watch(apply, server.reload_failed), name="config watch")
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(signame: str) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("%s received: draining (send it again to exit at once)", signame)
            server.request_stop()
        else:
            log.warning("second %s: exiting without waiting", signame)
            raise SystemExit(1)

    def on_hangup() -> None:
        if source is not None:
            log.info("SIGHUP received: reading the config from %s again", source.url)
            source.reload_now()
            return
        if reload is None:
            log.warning("SIGHUP received: no config to reload")
            return
        log.info("SIGHUP received: reloading the config%s",
                 f" from {config.config}" if config.config else "")
        server.reload_from(reload)

    # Handlers first: a signal that arrives as soon as "listening" is logged must drain too.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    await server.start()
    freeze_heap()
    if ready is not None:
        ready.set()
    await server.serve_forever()
    clean = await server.shutdown()
    if source is not None:
        await cancel_and_wait(watcher)
        await source.close()
    log.info("stopped%s", "" if clean else " (drain incomplete)")
    return 0 if clean else 1
