"""The client's unflushed buffer (tlog.client.buffer), on its own: what it holds, counts and
hands back for resends, answer by answer."""

from __future__ import annotations

from tlog.client.buffer import UnflushedBuffer


def filled(*sequences: int) -> UnflushedBuffer:
    buf = UnflushedBuffer(sequences[0] if sequences else 0)
    for seq in sequences:
        buf.put(seq, b"f%d" % seq)
        buf.written(seq, float(seq))
    return buf


def test_put_counts_bytes_and_replaces_a_sequence() -> None:
    buf = filled(5, 6, 7)
    assert (len(buf), buf.size, buf.lowest()) == (3, 6, 5)
    buf.put(6, b"longer frame")  # the same sequence again: replaced, counted once
    assert (len(buf), buf.size) == (3, 4 + len(b"longer frame"))
    assert 6 not in buf.awaiting  # a new frame is not written yet
    buf.put(2, b"x")  # below the lowest
    assert buf.lowest() == 2


def test_flush_ok_frees_what_it_names_once() -> None:
    buf = filled(1, 2, 3, 4)
    assert buf.flushed([1, 2, 9]) == (2, 4)  # 9 is not held: ignored
    assert buf.flushed([1]) == (0, 0)  # twice: ignored
    assert (len(buf), buf.size, buf.lowest()) == (2, 4, 3)
    assert list(buf.awaiting) == [3, 4]
    buf.flushed([3, 4])
    assert (len(buf), buf.size, buf.lowest(), buf.awaiting) == (0, 0, None, {})


def test_lowest_walks_over_gaps() -> None:
    buf = filled(*range(10, 20), 500)
    buf.flushed(range(10, 19))
    assert buf.lowest() == 19
    buf.flushed([19])
    assert buf.lowest() == 500  # a big gap: found by looking


def test_room_for_takes_one_frame_into_an_empty_buffer() -> None:
    buf = UnflushedBuffer()
    assert buf.room_for(10_000, 100)  # empty: anything goes (else a big block never would)
    buf.put(0, bytes(60))
    assert buf.room_for(40, 100) and not buf.room_for(41, 100)


def test_recv_ok_failed_and_the_resend_of_expired_blocks() -> None:
    buf = filled(1, 2, 3, 4)  # written at times 1, 2, 3, 4
    buf.received([2])
    assert buf.expired(3.0) == [1, 3]
    buf.refused([1], now=10.0)  # RecvFailed: waits again from 10, at the end
    assert buf.expired(3.0) == [3] and list(buf.awaiting) == [3, 4, 1]
    buf.flushed([3])
    # 3 was flushed meanwhile: not resent, no longer awaited
    assert buf.resend([4, 3, 1], now=20.0) == [b"f1", b"f4"]
    assert buf.awaiting == {1: 20.0, 4: 20.0}


def test_a_new_connection_gets_everything_in_order() -> None:
    buf = filled(7, 3, 5)
    buf.received([3, 5, 7])
    buf.connection_lost()
    assert buf.awaiting == {}
    assert buf.rewrite_all(now=1.0) == [b"f3", b"f5", b"f7"]
    assert list(buf.awaiting) == [3, 5, 7]
