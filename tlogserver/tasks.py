"""Stopping the daemon's background tasks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (if any) and wait until it has ended; its cancellation is not ours."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise  # we are being cancelled ourselves


class BackgroundTasks:
    """Tasks the daemon starts for their effect (nobody awaits their result: a handshake,
    a flusher's stop, a lease's release): kept referenced so that none is collected
    mid-way, their failures logged instead of "Task exception was never retrieved", and
    waited for (then cancelled) when the server stops."""

    def __init__(self, logger: logging.Logger) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._log = logger

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._log.error("%s failed: %s", task.get_name(), exc, exc_info=exc)

    async def close(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the tasks running (and those they start),
        then cancel what is left and wait for it to end."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._tasks:
            left = deadline - loop.time()
            if left <= 0:
                break
            await asyncio.wait(set(self._tasks), timeout=left)
        while self._tasks:
            left_over = set(self._tasks)
            for task in left_over:
                task.cancel()
            await asyncio.wait(left_over)  # their outcomes go to _done, not here
            self._tasks -= left_over
