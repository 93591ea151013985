"""The sans-I/O protocol core, against the bytes the Go client and server produced."""

from __future__ import annotations

import os
import random
import struct

import pytest

from tlog.protocol import (
    Block,
    BlockResponse,
    ClientConnection,
    ForceFlush,
    Handshake,
    HandshakeResponse,
    ProtocolError,
    ServerConnection,
    WaitNbdSlaveSync,
    block_hash,
    schema,
    wire,
)
from tlog.protocol.ranges import RangeError, range_count, range_data
from tlog.protocol.status import BlockStatus, HandshakeStatus, MessageType, Operation
from tlog.protocol.version import CURRENT_VERSION, MIN_SUPPORTED_VERSION, Stage, Version

from .vectors import WIRE_CAPTURES
from .vectors import wire as capture


def chunks(data: bytes, rng: random.Random) -> list[bytes]:
    out, at = [], 0
    while at < len(data):
        n = rng.choice([1, 2, 3, 7, 8, 9, 100, 4193, 10000])
        out.append(data[at:at + n])
        at += n
    return out


@pytest.mark.parametrize("name", WIRE_CAPTURES)
def test_server_side_decodes_go_client_stream(name: str) -> None:
    c2s, _, manifest = capture(name)
    expected = manifest["c2s_frames"]
    for seed in range(3):
        conn = ServerConnection()
        events = []
        for piece in chunks(c2s, random.Random(seed)):
            events.extend(conn.receive_data(piece))
        assert len(events) == len(expected)
        assert isinstance(events[0], Handshake)
        assert events[0].vdisk_id == "myimg"
        assert events[0].version == CURRENT_VERSION.to_uint32()
        for event, frame in zip(events[1:], expected[1:], strict=True):
            if frame["kind"] == "forceFlushAtSeq":
                assert event == ForceFlush(frame["decoded"]["sequence"])
            else:
                assert isinstance(event, Block)
                assert event.sequence == frame["decoded"]["sequence"]
                assert event.index == frame["decoded"]["index"]
                assert event.hash_ok()
                assert bytes(event.hash).hex() == frame["decoded"]["hash"]
        assert conn.buffered == 0


@pytest.mark.parametrize("name", WIRE_CAPTURES)
def test_client_side_decodes_go_server_stream(name: str) -> None:
    _, s2c, manifest = capture(name)
    conn = ClientConnection()
    events = []
    for piece in chunks(s2c, random.Random(1)):
        events.extend(conn.receive_data(piece))
    frames = manifest["s2c_frames"]
    assert events[0] == HandshakeResponse(frames[0]["decoded"]["version"], HandshakeStatus.OK)
    got = [(int(e.status), list(e.sequences)) for e in events[1:]]
    assert got == [(f["decoded"]["status"], f["decoded"]["sequences"]) for f in frames[1:]]


@pytest.mark.parametrize("name", WIRE_CAPTURES)
def test_our_encoders_rebuild_the_go_bytes(name: str) -> None:
    c2s, s2c, manifest = capture(name)
    out = [ClientConnection.send_handshake("myimg", 0)]
    conn = ServerConnection()
    for event in conn.receive_data(c2s)[1:]:
        if isinstance(event, Block):
            out.append(ClientConnection.send_block(event.sequence, event.index, event.timestamp,
                                                   bytes(event.data), event.operation))
        else:
            out.append(ClientConnection.send_force_flush(event.sequence))
    assert b"".join(out) == c2s
    responses = [ServerConnection.send_handshake_response(HandshakeStatus.OK)]
    for frame in manifest["s2c_frames"][1:]:
        responses.append(ServerConnection.send_response(
            BlockStatus(frame["decoded"]["status"]), frame["decoded"]["sequences"]))
    assert b"".join(responses) == s2c


def test_eof_before_handshake_answer_matches_go() -> None:
    from .vectors import need_vectors
    expected = (need_vectors() / "wire" / "eof_before_handshake.s2c.bin").read_bytes()
    assert ServerConnection.send_handshake_response(HandshakeStatus.INVALID_REQUEST) == expected


def handshaken() -> ServerConnection:
    conn = ServerConnection()
    assert conn.receive_data(ClientConnection.send_handshake("vd", 0)) == [
        Handshake(CURRENT_VERSION.to_uint32(), "vd", 0, False)]
    return conn


def test_all_message_types_roundtrip() -> None:
    conn = handshaken()
    data = os.urandom(4096)
    stream = (ClientConnection.send_block(7, -3, 99, data, 2)
              + ClientConnection.send_force_flush(12)
              + ClientConnection.send_wait_nbd_slave_sync())
    block, force, wait = conn.receive_data(stream)
    assert isinstance(block, Block)
    assert (block.sequence, block.index, block.timestamp, block.operation) == (7, -3, 99, 2)
    assert bytes(block.data) == data and bytes(block.hash) == block_hash(data)
    assert force == ForceFlush(12)
    assert isinstance(wait, WaitNbdSlaveSync)


def test_block_built_by_pycapnp_any_layout_is_accepted() -> None:
    # Another writer may lay the message out differently (here: data before hash,
    # two segments); the fallback decoder must still read it.
    data = os.urandom(100)
    msg = schema.TlogBlock.new_message()
    msg.sequence, msg.index, msg.timestamp, msg.operation = 5, 6, 7, 1
    msg.data = data
    msg.hash = block_hash(data)
    framed = bytes(msg.to_bytes())
    conn = handshaken()
    (block,) = conn.receive_data(bytes((MessageType.TLOG_BLOCK,)) + framed)
    assert block.sequence == 5 and bytes(block.data) == data and block.hash_ok()
    # Two segments: the data list in a second segment via a far pointer is not on our
    # fast path; build one by splitting a message with pycapnp's allocator.
    big = schema.TlogBlock.new_message(num_first_segment_words=8)
    big.sequence = 9
    big.hash = block_hash(b"x" * 300)
    big.data = b"x" * 300
    segments = big.to_segments()
    assert len(segments) > 1
    (block,) = conn.receive_data(bytes((MessageType.TLOG_BLOCK,)) + bytes(big.to_bytes()))
    assert block.sequence == 9 and bytes(block.data) == b"x" * 300


def test_hand_parsed_block_matches_pycapnp_for_random_blocks() -> None:
    rng = random.Random(5)
    for _ in range(200):
        data = rng.randbytes(rng.choice([0, 1, 7, 8, 9, 4096, 65536]))
        fields = (rng.getrandbits(64), rng.getrandbits(63) - (1 << 62), rng.getrandbits(64),
                  rng.choice([1, 2]))
        frame = wire.encode_block_frame(*fields, block_hash(data), data)
        seg = memoryview(frame)[8:]
        parsed = wire.parse_block(seg)
        ref = schema.TlogBlock.from_segments([bytes(seg)])
        assert parsed is not None
        assert (parsed.sequence, parsed.index, parsed.timestamp, parsed.operation) == (
            ref.sequence, ref.index, ref.timestamp, ref.operation) == fields
        assert bytes(parsed.data) == ref.data == data


def test_unknown_message_type_is_a_protocol_error() -> None:
    for mtype in (0, 4, 255):
        conn = handshaken()
        with pytest.raises(ProtocolError, match=f"unknown message type {mtype}"):
            conn.receive_data(bytes((mtype,)) + b"\0" * 16)
        assert conn.errored
        with pytest.raises(ProtocolError):
            conn.receive_data(b"")


def test_valid_events_before_an_error_are_delivered_first() -> None:
    conn = handshaken()
    good = ClientConnection.send_block(1, 1, 1, b"a" * 8)
    events = conn.receive_data(good + b"\x09garbage")
    assert [e.sequence for e in events] == [1]  # type: ignore[union-attr]
    with pytest.raises(ProtocolError, match="unknown message type 9"):
        conn.receive_data(b"")


def test_oversized_segment_table_is_refused_before_the_body() -> None:
    conn = ServerConnection(max_message_size=70_000)
    # a handshake announcing 1 GiB: refused from its 8-byte table alone
    with pytest.raises(ProtocolError, match="limit 70000"):
        conn.receive_data(struct.pack("<II", 0, (1 << 30) // 8))
    conn = handshaken()
    with pytest.raises(ProtocolError, match="segments"):
        conn.receive_data(b"\x01" + struct.pack("<I", 100000))
    # a 64 KiB block fits the default bound
    conn = handshaken()
    (block,) = conn.receive_data(ClientConnection.send_block(3, 3, 3, bytes(65536)))
    assert len(block.data) == 65536  # type: ignore[union-attr]
    conn = ServerConnection(max_message_size=4096)
    conn.receive_data(ClientConnection.send_handshake("vd", 0))
    with pytest.raises(ProtocolError, match="limit 4096"):
        conn.receive_data(ClientConnection.send_block(3, 3, 3, bytes(8192)))


def test_malformed_capnp_is_a_protocol_error() -> None:
    # a handshake whose root pointer points far outside its segment
    bad = struct.pack("<IIQ", 0, 1, (0x1000 << 2) | (3 << 32))
    with pytest.raises(ProtocolError, match="malformed HandshakeRequest"):
        ServerConnection().receive_data(bad)
    conn = handshaken()
    with pytest.raises(ProtocolError, match="malformed TlogBlock"):
        conn.receive_data(b"\x01" + bad)


def test_a_response_whose_sequence_list_is_out_of_bounds_is_a_protocol_error() -> None:
    # Found by tests/fuzz_wire.py: the struct is in bounds, so pycapnp only fails when the
    # list is read, which escaped as its KjException.
    conn = ClientConnection()
    conn.receive_data(ServerConnection.send_handshake_response(HandshakeStatus.OK))
    list_ptr = 1 | (5 << 32) | (100 << 35)  # 100 words of sequences in a 3-word segment
    bad = struct.pack("<IIQQQ", 0, 3, (1 << 32) | (1 << 48), 1, list_ptr)
    with pytest.raises(ProtocolError, match="malformed TlogResponse"):
        conn.receive_data(bad)
    with pytest.raises(ProtocolError, match="already failed"):
        conn.receive_data(wire.recv_ok(1))


def test_truncated_frames_wait_for_more() -> None:
    conn = handshaken()
    frame = ClientConnection.send_block(1, 1, 1, b"z" * 4096)
    for cut in (1, 4, 9, 100, len(frame) - 1):
        c = handshaken()
        assert c.receive_data(frame[:cut]) == []
        assert len(c.receive_data(frame[cut:])) == 1
    assert conn.receive_data(b"") == []


def test_client_side_reads_our_responses_and_unknown_statuses() -> None:
    conn = ClientConnection()
    stream = (ServerConnection.send_handshake_response(HandshakeStatus.INVALID_VDISK_ID)
              + wire.encode_response(2, list(range(25)))
              + wire.encode_response(99, [1]))
    hs, flush, unknown = conn.receive_data(stream)
    assert hs == HandshakeResponse(CURRENT_VERSION.to_uint32(), HandshakeStatus.INVALID_VDISK_ID)
    assert flush == BlockResponse(BlockStatus.FLUSH_OK, tuple(range(25)))
    assert unknown == BlockResponse(99, (1,))


def test_version_encoding_order_and_text() -> None:
    v = Version(1, 1, 0, Stage.ALPHA)
    assert v.to_uint32() == 0x01010008
    assert Version.from_uint32(0x01010008) == v
    assert str(v) == "1.1.0-alpha" and str(Version(2, 0, 1)) == "2.0.1"
    assert Version(1, 1, 0, Stage.ALPHA) < Version(1, 1, 0)
    assert Version(1, 0, 9) < Version(1, 1, 0, Stage.DEV)
    assert not Version(1, 1, 0, Stage.BETA) < Version(1, 1, 0, Stage.ALPHA)
    assert Version(1, 0, 0) < MIN_SUPPORTED_VERSION <= CURRENT_VERSION
    assert sorted([Version(2, 0, 0), Version(1, 2, 3), Version(1, 2, 3, Stage.RC)]) == [
        Version(1, 2, 3, Stage.RC), Version(1, 2, 3), Version(2, 0, 0)]


def test_large_reads_grow_the_buffer_while_views_are_held() -> None:
    # More than the initial buffer in one call, while a view from get_buffer is alive
    # (an event loop may hold it): the buffer must be replaced, not resized.
    conn = ClientConnection()
    stream = ServerConnection.send_handshake_response(HandshakeStatus.OK) + b"".join(
        wire.encode_response(1, [i]) for i in range(60_000))
    held = conn._reader.get_buffer()
    events = conn.receive_data(stream)
    assert len(events) == 60_001 and events[-1] == BlockResponse(BlockStatus.RECV_OK, (59_999,))
    del held
    server = handshaken()
    view = server.get_buffer()
    block = ClientConnection.send_block(1, 1, 1, bytes(65536))
    view[:100] = block[:100]
    assert server.buffer_updated(100) == []
    for at in range(100, len(block), 30_000):  # the frame outgrows the free space
        chunk = block[at:at + 30_000]
        view = server.get_buffer()
        view[:len(chunk)] = chunk
        events = server.buffer_updated(len(chunk))
    assert [e.sequence for e in events] == [1]  # type: ignore[union-attr]


def test_fast_block_path_agrees_with_the_generic_parser() -> None:
    rng = random.Random(9)
    for _ in range(100):
        data = rng.randbytes(rng.choice([0, 1, 9, 4096, 65536]))
        msg = ClientConnection.send_block(rng.getrandbits(64), rng.getrandbits(63), 5,
                                          data, rng.choice([1, 2]))
        buf = bytearray(b"junk" + msg + b"tail")
        got = wire.take_block(buf, 4, len(buf), 1 << 20)
        assert got is not None and got[1] == 4 + len(msg)
        generic = wire.parse_block(memoryview(msg)[9:])
        assert got[0] == generic
        assert wire.take_block(buf, 4, len(buf) - 5, 1 << 20) is None  # incomplete
        assert wire.take_block(buf, 4, len(buf), len(msg) - 10) is None  # over the limit
    other = schema.TlogBlock.new_message(sequence=1, data=b"abc", hash=block_hash(b"abc"))
    odd = bytearray(b"\x01" + bytes(other.to_bytes()))  # data laid out before the hash
    assert wire.take_block(odd, 0, len(odd), 1 << 20) is None


def test_recv_ok_is_the_general_encoding() -> None:
    seqs = (0, 1, 2**32 + 5, 2**64 - 1)
    for seq in seqs:
        assert wire.recv_ok(seq) == wire.encode_response(BlockStatus.RECV_OK, [seq])
    conn = ClientConnection()
    stream = (ServerConnection.send_handshake_response(HandshakeStatus.OK)
              + b"".join(wire.recv_ok(seq) for seq in seqs))
    assert conn.receive_data(stream)[1:] == [BlockResponse(BlockStatus.RECV_OK, (seq,))
                                             for seq in seqs]


@pytest.mark.parametrize(("last", "has_log", "epoch", "slave_sync", "range_ops"), [
    (0, False, 0, False, False), (41, True, 0, False, False), (7, True, 3, False, False),
    (0, False, 0, True, False), (0, False, 0, False, True), (2**63 + 5, True, 2**40, True, True)])
def test_our_handshake_response_fields_are_pycapnps_layout(last: int, has_log: bool,
                                                           epoch: int, slave_sync: bool,
                                                           range_ops: bool) -> None:
    """The hand-laid HandshakeResponse with our fields (@2 lastSequence, @3 hasLog, @4 epoch,
    @5 slaveSync, @6 rangeOps) is the bytes pycapnp lays out for the same values, and reads
    back."""
    ours = ServerConnection.send_handshake_response(
        HandshakeStatus.OK, last_sequence=last, has_log=has_log, epoch=epoch,
        slave_sync=slave_sync, range_ops=range_ops)
    msg = schema.HandshakeResponse.new_message()
    msg.version, msg.status = CURRENT_VERSION.to_uint32(), int(HandshakeStatus.OK)
    if last or has_log or epoch or slave_sync or range_ops:  # else: the reference's struct
        msg.lastSequence, msg.hasLog, msg.epoch, msg.slaveSync = last, has_log, epoch, \
            slave_sync
        msg.rangeOps = range_ops
        assert ours == msg.to_bytes()
    (event,) = ClientConnection().receive_data(ours)
    assert isinstance(event, HandshakeResponse)
    assert (event.last_sequence, event.has_log, event.epoch, event.slave_sync,
            event.range_ops) == (last, has_log, epoch, slave_sync, range_ops)


@pytest.mark.parametrize(("reset", "cont", "range_ops", "token"), [
    (False, False, False, None), (True, True, True, None), (False, False, True, b"tok"),
    (True, False, False, b"t")])
def test_our_handshake_request_bits_are_pycapnps_layout(reset: bool, cont: bool,
                                                        range_ops: bool,
                                                        token: bytes | None) -> None:
    """resetFirstSequence, continueSequence (@5) and rangeOps (@6) where pycapnp reads them;
    without our fields, the reference's bytes."""
    ours = ClientConnection.send_handshake("vd", 77, reset, token=token,
                                           continue_sequence=cont, range_ops=range_ops)
    with schema.HandshakeRequest.from_bytes(ours) as msg:
        assert (msg.vdiskID, msg.firstSequence, msg.resetFirstSequence, msg.continueSequence,
                msg.rangeOps, bytes(msg.token)) == ("vd", 77, reset, cont, range_ops,
                                                    token or b"")
    (event,) = ServerConnection().receive_data(ours)
    assert isinstance(event, Handshake)
    assert (event.continue_sequence, event.range_ops) == (cont, range_ops)


def test_a_range_block_round_trips_and_bad_ranges_are_named() -> None:
    data = range_data(10, 2**40)
    frame = ClientConnection.send_block(5, 10, 99, data, Operation.DELETE_RANGE)
    (block,) = handshaken().receive_data(frame)
    assert isinstance(block, Block) and block.operation == 3 and block.hash_ok()
    assert range_count(block.index, block.data) == 2**40
    for first, count, why in ((0, 0, "at least one"), (-1, 5, ">= 0"),
                              (2**63 - 1, 2, "past the last index")):
        with pytest.raises(RangeError, match=why):
            range_data(first, count)
    with pytest.raises(RangeError, match="7 bytes of data, not 8"):
        range_count(3, b"1234567")
    with pytest.raises(RangeError, match="at least one"):
        range_count(3, bytes(8))
