"""etcd as the server's configuration source (``--config etcd://HOST:PORT[,...]/PREFIX``):
the keys are read as `tlog.configsource` lays them out, and watched.

`EtcdSource.watch` follows changes, so a change applies to new handshakes at once. A
change that does not validate is logged and ignored (the running config stays); while
etcd cannot be reached the last good config stays, `/readyz` says why and
``tlog_config_source_up`` is 0. Writes to the servers' lease keys (vdisk owners, server
ids) are not configuration: they do not make the server read its config again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from tlog.configsource import ConfigError, EtcdStore, EtcdUrl, is_lease_key, key_name, key_path

log = logging.getLogger("tlogserver")

#: The longest pause between reconnection attempts, in seconds.
RETRY_MAX = 5.0
#: Changes arriving together are applied as one reload after this pause.
SETTLE = 0.05


class EtcdSource(EtcdStore):
    """Reads and watches the configuration keys; remembers whether etcd answers."""

    def __init__(self, url: EtcdUrl) -> None:
        super().__init__(url)
        self.error = ""  # why etcd cannot be read now ("" while it can)
        self._wake = asyncio.Event()

    def reload_now(self) -> None:
        """Read everything again at once (SIGHUP)."""
        self._wake.set()

    async def watch(self, apply: Callable[[dict[str, Any]], None],
                    rejected: Callable[[str], Any] | None = None) -> None:
        """Forever: wait for a change of a configuration key, read everything, ``apply`` it
        (keys that cannot be read as configuration go to ``rejected``, or are logged).
        While etcd is unreachable, retry with backoff; when it is back, read everything
        (changes made meanwhile are not missed)."""
        delay = 0.1
        while True:
            try:
                client = await self.client()
                watch = await client.watch_prefix(key_path(self.url.prefix, ""))
                if self.error:
                    log.info("config source %s reachable again", self.url)
                    self.error = ""
                    apply(await self.load())  # what changed while it was away
                delay = 0.1
                await self._follow(watch, apply, rejected)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd gone (or a bug): keep the last good config
                message = str(exc) or type(exc).__name__
                if not self.error:
                    log.error("config source %s unreachable, keeping the running config: %s",
                              self.url, message)
                self.error = message
                await self.drop()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    def _is_config_event(self, event: Any) -> bool:
        name = key_name(self.url.prefix, getattr(getattr(event, "kv", None), "key", b""))
        return name is None or not is_lease_key(name)

    async def _follow(self, watch: Any, apply: Callable[[dict[str, Any]], None],
                      rejected: Callable[[str], Any] | None) -> None:
        events = watch.__aiter__()
        waiter: asyncio.Future[Any] | None = None
        try:
            while True:
                if waiter is None:
                    waiter = asyncio.ensure_future(events.__anext__())
                woken = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait({waiter, woken}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()
                if waiter.done():
                    event = waiter.result()  # raises when the stream broke
                    waiter = None
                    if not self._wake.is_set() and not self._is_config_event(event):
                        continue  # a vdisk claimed or released, a server id registered
                    await asyncio.sleep(SETTLE)  # a burst of changes: one reload
                self._wake.clear()
                try:
                    data = await self.load()
                except ConfigError as exc:
                    if "unreachable" in str(exc):
                        raise
                    if rejected is not None:
                        rejected(str(exc))
                    else:
                        log.error("config reload rejected, keeping the running config: %s",
                                  exc)
                    continue
                apply(data)
        finally:
            # Left while the next event is awaited (a stop, a broken stream): that read
            # ends when the watch is dropped, and its outcome is of no interest.
            if waiter is not None:
                waiter.cancel()
                waiter.add_done_callback(_ignore_outcome)


def _ignore_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
