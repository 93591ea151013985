"""What a client reports: its counters, and the stream of the server's answers."""

from __future__ import annotations

import asyncio
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
