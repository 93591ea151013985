"""Who waits on a `TlogClient`: sends waiting for room in the unflushed buffer (first come,
first served), callers waiting for FlushOK up to a sequence (`wait_flushed`), and callers
waiting for the answer to a WaitNbdSlaveSync. Kept apart from the client's connection and
buffer logic: each kind of waiter has one rule for when it is woken."""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
from collections.abc import Callable


class Waiters:
    """The futures of everything waiting on one client (loop thread only)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        #: sends waiting for buffer room, in order: (sequence, frame, future)
        self._room: collections.deque[tuple[int, bytes, asyncio.Future[None]]] = (
            collections.deque())
        #: a heap of (highest sequence waited for, tie-breaker, future)
        self._flushed: list[tuple[int, int, asyncio.Future[None]]] = []
        #: WaitNbdSlaveSync answers come in the order the commands went out
        self._sync: collections.deque[asyncio.Future[None]] = collections.deque()
        self._ids = itertools.count()

    # -- room in the buffer --
    @property
    def want_room(self) -> bool:
        """Whether a send waits for room (a later one must queue behind it)."""
        return bool(self._room)

    def wait_room(self, sequence: int, frame: bytes) -> asyncio.Future[None]:
        """A future done once ``frame`` was admitted (`admit`) in its turn."""
        future: asyncio.Future[None] = self._loop.create_future()
        self._room.append((sequence, frame, future))
        return future

    def admit(self, room_for: Callable[[int], bool], put: Callable[[int, bytes], None]) -> None:
        """Room came back: ``put`` the waiting frames, in order, while ``room_for`` their
        size; the first that does not fit stops the others."""
        waiting = self._room
        while waiting:
            sequence, frame, future = waiting[0]
            if future.done():  # its sender gave up (cancelled)
                waiting.popleft()
                continue
            if not room_for(len(frame)):
                break
            waiting.popleft()
            put(sequence, frame)
            future.set_result(None)

    # -- FlushOK --
    def wait_flushed(self, target: int) -> asyncio.Future[None]:
        """A future done once every sequence up to ``target`` is flushed (`flushed_below`)."""
        future: asyncio.Future[None] = self._loop.create_future()
        heapq.heappush(self._flushed, (target, next(self._ids), future))
        return future

    @property
    def want_flushed(self) -> bool:
        return bool(self._flushed)

    def flushed_below(self, low: int | None) -> None:
        """Every sequence below ``low`` (None: every one sent) is flushed: wake who waited
        for no more than that."""
        waiting = self._flushed
        while waiting and (low is None or waiting[0][0] < low):
            future = heapq.heappop(waiting)[2]
            if not future.done():
                future.set_result(None)

    # -- WaitNbdSlaveSync --
    def wait_sync(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = self._loop.create_future()
        self._sync.append(future)
        return future

    def pending_syncs(self) -> int:
        """The commands still unanswered (sent again after a reconnect); drops the ones
        whose caller gave up."""
        self._sync = collections.deque(f for f in self._sync if not f.done())
        return len(self._sync)

    def answer_sync(self, error: BaseException | None) -> None:
        """The oldest WaitNbdSlaveSync was answered: done, or failed with ``error``."""
        if not self._sync:
            return
        future = self._sync.popleft()
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    # -- the end --
    def fail(self, error: Callable[[], BaseException]) -> None:
        """The client cannot go on: every waiter gets a fresh ``error()``."""
        futures = [f for _, _, f in self._room] + [f for _, _, f in self._flushed]
        futures += self._sync
        self._room.clear()
        self._flushed.clear()
        self._sync.clear()
        for future in futures:
            if not future.done():
                future.set_exception(error())
