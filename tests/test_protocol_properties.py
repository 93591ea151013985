"""Property tests of the sans-I/O core: any bytes, any chunking."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlog.protocol import (
    Block,
    ClientConnection,
    ForceFlush,
    ProtocolError,
    ServerConnection,
    WaitNbdSlaveSync,
    wire,
)

LIMIT = 70_000
FAST = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

messages = st.one_of(
    st.builds(lambda seq, idx, data, op: ("block", seq, idx, data, op),
              st.integers(0, 2**64 - 1), st.integers(-(2**63), 2**63 - 1),
              st.binary(max_size=5000), st.sampled_from([1, 2])),
    st.builds(lambda seq: ("force", seq), st.integers(0, 2**64 - 1)),
    st.just(("wait",)),
)


def encode(msg: tuple) -> bytes:  # type: ignore[type-arg]
    if msg[0] == "block":
        _, seq, idx, data, op = msg
        return ClientConnection.send_block(seq, idx, 7, data, op)
    if msg[0] == "force":
        return ClientConnection.send_force_flush(msg[1])
    return ClientConnection.send_wait_nbd_slave_sync()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


@FAST
@given(st.lists(messages, max_size=20), st.lists(st.integers(0, 10**6), max_size=30))
def test_any_chunking_of_a_valid_stream_gives_the_same_events(
        msgs: list, cuts: list[int]) -> None:  # type: ignore[type-arg]
    stream = ClientConnection.send_handshake("vd", 3) + b"".join(encode(m) for m in msgs)
    conn = ServerConnection(max_message_size=LIMIT)
    events = []
    for piece in split(stream, cuts):
        events.extend(conn.receive_data(piece))
    assert len(events) == len(msgs) + 1
    for event, msg in zip(events[1:], msgs, strict=True):
        if msg[0] == "block":
            assert isinstance(event, Block)
            assert (event.sequence, event.index, bytes(event.data), event.operation) == (
                msg[1], msg[2], msg[3], msg[4])
            assert event.hash_ok()
        elif msg[0] == "force":
            assert event == ForceFlush(msg[1])
        else:
            assert isinstance(event, WaitNbdSlaveSync)
    assert conn.buffered == 0


@FAST
@given(st.binary(max_size=3000), st.booleans(), st.lists(st.integers(0, 5000), max_size=10))
def test_random_bytes_never_crash_and_never_overbuffer(junk: bytes, after_handshake: bool,
                                                       cuts: list[int]) -> None:
    conn = ServerConnection(max_message_size=LIMIT)
    if after_handshake:
        conn.receive_data(ClientConnection.send_handshake("vd", 0))
    try:
        for piece in split(junk, cuts):
            conn.receive_data(piece)
            # what is buffered is at most one incomplete message of the allowed size
            assert conn.buffered <= LIMIT + 9 + 4 * (wire.MAX_SEGMENTS + 1)
    except ProtocolError:
        assert conn.errored


@FAST
@given(st.integers(1, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_hostile_segment_tables_are_refused_from_the_table_alone(count_minus_one: int,
                                                                  words: int) -> None:
    table = struct.pack("<I", count_minus_one) + struct.pack("<I", words) * min(
        count_minus_one + 1, 70)
    table += bytes(-len(table) % 8)  # the padding that completes a table
    conn = ServerConnection(max_message_size=LIMIT)
    conn.receive_data(ClientConnection.send_handshake("vd", 0))
    try:
        conn.receive_data(b"\x01" + table)
    except ProtocolError:
        return
    # accepted tables are small and bounded: the body is simply not there yet
    assert count_minus_one + 1 <= wire.MAX_SEGMENTS
    assert (count_minus_one + 1) * words * 8 <= LIMIT


@FAST
@given(st.binary(max_size=2000), st.lists(st.integers(0, 3000), max_size=8))
def test_client_side_random_bytes_never_crash(junk: bytes, cuts: list[int]) -> None:
    conn = ClientConnection(max_message_size=LIMIT)
    try:
        for piece in split(junk, cuts):
            conn.receive_data(piece)
    except ProtocolError:
        pass
