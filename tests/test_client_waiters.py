"""`tlog.client.waiters.Waiters` on its own: who is woken, in which order, and when."""

from __future__ import annotations

import asyncio

import pytest

from tlog.client.errors import ClientClosedError
from tlog.client.waiters import Waiters


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_room_is_given_in_order_and_a_frame_that_does_not_fit_stops_the_rest() -> None:
    async def scenario() -> None:
        w = Waiters(asyncio.get_running_loop())
        first, second, third = (w.wait_room(s, b"x" * n) for s, n in ((1, 5), (2, 50), (3, 1)))
        assert w.want_room
        put: list[int] = []
        room = 10
        w.admit(lambda size: size <= room, lambda seq, frame: put.append(seq))
        assert put == [1] and first.done() and not second.done() and not third.done()
        second.cancel()  # its sender gave up: skipped
        w.admit(lambda size: size <= room, lambda seq, frame: put.append(seq))
        assert put == [1, 3] and third.done() and not w.want_room
    run(scenario())


def test_flush_waiters_wake_once_everything_up_to_their_target_is_flushed() -> None:
    async def scenario() -> None:
        w = Waiters(asyncio.get_running_loop())
        at5, at9, at2 = w.wait_flushed(5), w.wait_flushed(9), w.wait_flushed(2)
        w.flushed_below(3)  # 0..2 flushed
        assert at2.done() and not at5.done() and not at9.done()
        w.flushed_below(6)
        assert at5.done() and not at9.done() and w.want_flushed
        w.flushed_below(None)  # everything sent is flushed
        assert at9.done() and not w.want_flushed
    run(scenario())


def test_slave_sync_answers_go_to_the_oldest_command_still_waited_for() -> None:
    async def scenario() -> None:
        w = Waiters(asyncio.get_running_loop())
        gone, first, second = w.wait_sync(), w.wait_sync(), w.wait_sync()
        gone.cancel()
        assert w.pending_syncs() == 2  # resent after a reconnect: the cancelled one is not
        w.answer_sync(None)
        w.answer_sync(ValueError("not in step"))
        w.answer_sync(None)  # more answers than waiters: nothing to do
        assert first.result() is None
        with pytest.raises(ValueError, match="not in step"):
            second.result()
    run(scenario())


def test_a_failure_reaches_every_waiter_with_its_own_exception() -> None:
    async def scenario() -> None:
        w = Waiters(asyncio.get_running_loop())
        futures = [w.wait_room(1, b"x"), w.wait_flushed(4), w.wait_sync()]
        w.fail(lambda: ClientClosedError("client closed"))
        errors = [f.exception() for f in futures]
        assert all(isinstance(e, ClientClosedError) for e in errors)
        assert len({id(e) for e in errors}) == 3
        assert not w.want_room and not w.want_flushed and w.pending_syncs() == 0
    run(scenario())
