"""What a client reports: its counters, and the server's answers handed to the user (a
callback, async iterators)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tlog.protocol import BlockResponse
from tlog.protocol.status import BlockStatus


@dataclass(frozen=True)
class ClientStats:
    """Counters of one client, as of the moment they were read."""

    sent_blocks: int  # blocks handed to send()
    flushed_blocks: int  # blocks whose FlushOK arrived
    unflushed_blocks: int
    unflushed_bytes: int
    resends: int  # blocks sent again after the resend timeout or a RecvFailed
    reconnect_resends: int  # blocks sent again after a reconnect
    reconnects: int  # successful reconnections (the first connect not counted)
    last_flushed: int | None  # highest sequence with FlushOK
    server: str | None  # the server connected to, None while reconnecting


ResponseCallback = Callable[[BlockStatus | int, Sequence[int]], None]

log = logging.getLogger("tlog.client")


class ResponseFanout:
    """Hands every server answer to the user: ``callback(status, sequences)`` and every
    open `ResponseStream`. After the client's own bookkeeping, so that nothing the user's
    code does can upset it; what the callback raises is logged (with its traceback the
    first time) and counted in ``callback_errors``, not propagated."""

    def __init__(self, callback: ResponseCallback | None, what: str) -> None:
        self.callback = callback
        self.subscribers: list[asyncio.Queue[BlockResponse | None]] = []
        self.callback_errors = 0
        self.what = what

    @property
    def wanted(self) -> bool:
        return self.callback is not None or bool(self.subscribers)

    def stream(self) -> ResponseStream:
        return ResponseStream(self.subscribers)

    def deliver(self, responses: list[BlockResponse]) -> None:
        if self.subscribers:
            for event in responses:
                for queue in self.subscribers:
                    queue.put_nowait(event)
        callback = self.callback
        if callback is not None:
            for status, seqs in responses:
                try:
                    callback(status, seqs)
                except Exception:
                    self._failed()

    def end(self) -> None:
        """The client closed or failed: every stream ends."""
        for queue in self.subscribers:
            queue.put_nowait(None)

    def _failed(self) -> None:
        self.callback_errors += 1
        if self.callback_errors == 1:
            log.exception("%s: on_response raised (logged once; the client goes on)",
                          self.what)
        else:
            log.debug("%s: on_response raised again (%d times)", self.what,
                      self.callback_errors, exc_info=True)


class ResponseStream:
    """The server's block responses, as an async iterator (`TlogClient.responses`).

    Subscribed from creation on; it ends when the client closes or `close` is
    called. It is unbounded: a subscriber must keep reading.
    """

    def __init__(self, subscribers: list[asyncio.Queue[BlockResponse | None]]) -> None:
        # the client's list of subscriber queues: it puts every response (None at close)
        self._subscribers = subscribers
        self._queue: asyncio.Queue[BlockResponse | None] = asyncio.Queue()
        subscribers.append(self._queue)

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> BlockResponse:
        item = await self._queue.get()
        if item is None:
            self.close()
            raise StopAsyncIteration
        return item

    def close(self) -> None:
        if self._queue in self._subscribers:
            self._subscribers.remove(self._queue)
