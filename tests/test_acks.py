"""The ack batcher on its own (`tlogserver.acks`): which answers are held, when they go
out, that nothing is reordered, and when a streaming client's reading is paused and resumed.
The batcher is a plain object: it is driven here as the connection drives it, with a real
event loop for its timer; tests/test_answers.py checks it inside a connection."""

from __future__ import annotations

import asyncio
from time import perf_counter

from tlogserver.acks import HOLD_BELOW_BLOCKS, HOLD_MAX_BYTES, STREAMING_BLOCKS, AckBatcher
from tlogserver.stats import RECV_BUCKETS, Histogram

WAIT = 5.0


class Client:
    """What the batcher writes to, and whether it has paused reading."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.paused: set[str] = set()
        self.written = asyncio.Event()

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.written.set()

    def pause(self, reason: str) -> None:
        self.paused.add(reason)

    def resume(self, reason: str) -> None:
        self.paused.discard(reason)

    async def next_write(self) -> None:
        self.written.clear()
        async with asyncio.timeout(WAIT):
            await self.written.wait()


def batcher() -> tuple[AckBatcher, Client, Histogram]:
    client = Client()
    latency = Histogram(RECV_BUCKETS)
    return AckBatcher(client.write, client, latency), client, latency


def test_small_reads_within_ack_delay_are_held_and_written_together() -> None:
    async def scenario() -> None:
        acks, client, latency = batcher()
        acks.answer(b"a", 1, perf_counter(), 0.05)  # nothing written for ack_delay: at once
        assert client.writes == [b"a"] and latency.count == 1
        written_at = perf_counter()
        acks.answer(b"b", 1, perf_counter(), 0.05)
        acks.answer(b"c", HOLD_BELOW_BLOCKS - 1, perf_counter(), 0.05)
        assert client.writes == [b"a"] and acks.held_bytes == 2
        await client.next_write()
        assert client.writes == [b"a", b"bc"]  # one write for both, ack_delay after the first
        assert perf_counter() - written_at >= 0.04
        assert latency.count == 2  # the held reads are timed once, from the oldest
        assert acks.held_bytes == 0
    asyncio.run(scenario())


def test_any_other_write_takes_the_held_answers_along_first() -> None:
    async def scenario() -> None:
        acks, client, _ = batcher()
        acks.send(b"handshake")
        acks.answer(b"r1", 1, perf_counter(), 10.0)
        acks.answer(b"r2", 1, perf_counter(), 10.0)
        acks.send(b"flush-ok")
        assert client.writes == [b"handshake", b"r1r2flush-ok"]
        acks.release()  # nothing held: nothing written
        assert client.writes == [b"handshake", b"r1r2flush-ok"]
        acks.answer(b"r3", 1, perf_counter(), 10.0)
        acks.release()  # e.g. the connection closes: what is held goes out first
        assert client.writes[-1] == b"r3"
    asyncio.run(scenario())


def test_big_reads_and_a_zero_ack_delay_are_answered_at_once() -> None:
    async def scenario() -> None:
        acks, client, _ = batcher()
        acks.send(b"handshake")  # just written: a small read would be held...
        acks.answer(b"big", HOLD_BELOW_BLOCKS, perf_counter(), 10.0)  # ...not a big one
        assert client.writes == [b"handshake", b"big"]
        for n in range(3):
            acks.answer(b"%d" % n, 1, perf_counter(), 0.0)
        assert client.writes == [b"handshake", b"big", b"0", b"1", b"2"]
    asyncio.run(scenario())


def test_held_answers_go_out_once_they_reach_the_byte_bound() -> None:
    async def scenario() -> None:
        acks, client, _ = batcher()
        acks.send(b"")
        chunk = b"x" * (HOLD_MAX_BYTES // 4)
        for _ in range(3):
            acks.answer(chunk, 1, perf_counter(), 10.0)
        assert client.writes == [b""]
        acks.answer(chunk, 1, perf_counter(), 10.0)
        assert client.writes == [b"", chunk * 4] and acks.held_bytes == 0
    asyncio.run(scenario())


def test_a_streaming_client_is_paused_while_its_answers_are_held() -> None:
    async def scenario() -> None:
        acks, client, _ = batcher()
        acks.send(b"")
        for _ in range(STREAMING_BLOCKS - 1):
            acks.read(1, flush_asked=False)
            acks.answer(b"r", 1, perf_counter(), 0.05)
        assert client.paused == set()  # not streaming yet
        acks.read(1, flush_asked=False)
        acks.answer(b"r", 1, perf_counter(), 0.05)
        assert client.paused == {"streaming"}
        await client.next_write()  # the held answers go out: reading goes on
        assert client.paused == set() and client.writes[-1] == b"r" * STREAMING_BLOCKS
        # A client that asks for a flush waits for its answer: never paused after it.
        acks.read(3, flush_asked=True)
        acks.answer(b"f", 1, perf_counter(), 0.05)
        assert client.paused == set()
    asyncio.run(scenario())


def test_a_hold_that_writes_at_once_leaves_reading_going() -> None:
    """The answers that reach the byte bound go out within the call: pausing then would
    leave nothing held to resume reading when written."""
    async def scenario() -> None:
        acks, client, _ = batcher()
        acks.send(b"")
        acks.read(STREAMING_BLOCKS, flush_asked=False)
        acks.answer(b"x" * HOLD_MAX_BYTES, 1, perf_counter(), 10.0)
        assert client.writes == [b"", b"x" * HOLD_MAX_BYTES]
        assert client.paused == set()
    asyncio.run(scenario())
