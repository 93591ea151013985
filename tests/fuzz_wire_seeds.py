"""The seed corpus of `tests.fuzz_wire`: valid streams and messages built with the
encoders (and with pycapnp, for the layouts the hand-written fast paths leave to it), so
that the fuzzer starts from deep states (a handshake, then blocks and commands) rather
than having to discover the framing byte by byte. A few hostile ones besides."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

from tlog.protocol import ClientConnection, ServerConnection, schema, wire
from tlog.protocol.connection import block_hash
from tlog.protocol.ranges import range_data
from tlog.protocol.status import BlockStatus, HandshakeStatus, Operation

#: A seed as `tests.fuzz_wire.Case` takes it: target, options, numbers, payload.
Seed = tuple[str, int, tuple[int, ...], bytes]
SEND = ClientConnection


def _block(sequence: int, size: int = 24, operation: int = Operation.SET) -> bytes:
    data = bytes((sequence * 7 + i) & 0xFF for i in range(size))
    return SEND.send_block(sequence, sequence * 3, 1_700_000_000 + sequence, data, operation)


def _capnp_segments(struct_type: Any, first_words: int, **fields: object) -> list[bytes]:
    """A message built by pycapnp with a first segment of ``first_words``: small ones make
    it spill into more segments, reached through far pointers."""
    message = struct_type.new_message(num_first_segment_words=first_words, **fields)
    return [bytes(s) for s in message.to_segments()]


def _framed(segments: list[bytes]) -> bytes:
    table = struct.pack(f"<I{len(segments)}I", len(segments) - 1,
                        *(len(s) // 8 for s in segments))
    return table + bytes(-len(table) & 7) + b"".join(segments)


def _capnp_block(sequence: int, first_words: int = 1024, data_first: bool = False) -> bytes:
    data = bytes(range(sequence % 7, sequence % 7 + 20))
    fields: dict[str, object] = {"sequence": sequence, "index": sequence, "operation": 1}
    pair = {"data": data, "hash": block_hash(data)}
    for name in (("data", "hash") if data_first else ("hash", "data")):
        fields[name] = pair[name]
    return bytes((1,)) + _framed(_capnp_segments(schema.TlogBlock, first_words, **fields))


def server_streams() -> Iterator[bytes]:
    """What a client may send: a handshake, then messages."""
    hello = SEND.send_handshake("vd1", 0)
    yield hello
    yield hello + b"".join(_block(s) for s in range(3))
    yield (SEND.send_handshake("vdisk-2", 5, True, token=b"secret-token", continue_sequence=True,
                               range_ops=True)
           + _block(5) + _block(6, 0, Operation.DELETE)
           + SEND.send_block(7, 100, 0, range_data(100, 50), Operation.DELETE_RANGE)
           + SEND.send_force_flush(7) + SEND.send_wait_nbd_slave_sync())
    # layouts the fast paths leave to pycapnp: other hash sizes, data before hash, far pointers
    yield (hello + SEND.send_block(1, 1, 1, b"abc", hash=b"") + SEND.send_block(2, 2, 2, b"x" * 9,
                                                                                hash=b"h" * 31)
           + _capnp_block(3, data_first=True) + _capnp_block(4, first_words=2))
    yield _framed(_capnp_segments(schema.HandshakeRequest, 2, version=0x01010008,
                                  vdiskID="far", firstSequence=9)) + _block(9)
    yield hello + bytes((1,)) + wire.frame(bytes(8))  # a null root: every field zero
    yield hello + _block(1, 4096)
    # hostile: unknown type, huge tables, junk instead of a handshake, a truncated frame
    yield hello + _block(1) + b"\x09" + bytes(16)
    yield hello + b"\x01" + struct.pack("<II", 1_000_000, 1)
    yield hello + b"\x01" + struct.pack("<II", 0, 0x20000000)
    yield b"\xde\xad\xbe\xef" * 8
    yield hello + _block(1)[:60]


def client_streams() -> Iterator[bytes]:
    """What a server may send: a handshake response, then responses."""
    ok = ServerConnection.send_handshake_response(HandshakeStatus.OK)
    yield ok + wire.recv_ok(1) + wire.recv_ok(2)
    yield (ServerConnection.send_handshake_response(HandshakeStatus.OK, last_sequence=41,
                                                    has_log=True, epoch=3, slave_sync=True,
                                                    range_ops=True)
           + wire.encode_response(BlockStatus.FLUSH_OK, [1, 2, 3])
           + wire.encode_response(BlockStatus.FLUSH_FAILED, [])
           + wire.encode_response(77, [5]) + wire.recv_ok(2 ** 64 - 1))
    yield ServerConnection.send_handshake_response(HandshakeStatus.UNAUTHORIZED)
    response = _capnp_segments(schema.TlogResponse, 2, status=2, sequences=[4, 5])
    yield ok + _framed(response) + wire.recv_ok(6)
    yield ok + wire.recv_ok(1) + struct.pack("<II", 70, 0)  # too many segments


def seeds() -> Iterator[Seed]:
    """The corpus: every stream whole and in chunks, fed every way, and the messages one by
    one to the functions that parse them."""
    chunkings: list[tuple[int, ...]] = [(), (1, 2, 3, 4, 5, 6, 7, 8), (9, 40, 0, 97, 13)]
    for n, stream in enumerate(server_streams()):
        for c, numbers in enumerate(chunkings):
            yield ("server", (n + c) << 2 & 0x0C, numbers, stream)
    for n, stream in enumerate(client_streams()):
        for c, numbers in enumerate(chunkings):
            yield ("client", (n + c) << 2 & 0x0C, numbers, stream)
    blocks = [_block(1), _block(2, 0), _block(3, 100, Operation.DELETE), _capnp_block(4)]
    responses = [wire.recv_ok(1), wire.encode_response(BlockStatus.FLUSH_OK, [1, 2]),
                 wire.encode_response(-1, [])]
    yield ("take_blocks", 0, (), b"".join(blocks))
    yield ("take_blocks", 0, (1, 0, 2), b"\x00" + b"".join(blocks))
    yield ("take_responses", 0, (), b"".join(responses))
    yield ("take_responses", 0, (0, 3), b"".join(responses) + b"\x00\x00\x00")
    for message in blocks:
        yield ("frame_header", 0, (1,), message)  # after the type byte
    yield ("frame_header", 0, (), SEND.send_handshake("vd", 1, token=b"t"))
    yield ("frame_header", 1, (), struct.pack("<IIII", 2, 1, 2, 3))
    yield ("frame_header", 1, (), struct.pack("<II", 0, 9))  # 72 bytes: over the bound of 64
    yield ("frame_header", 0, (), struct.pack("<II", 64, 0))  # 65 segments
    segments = [b"".join(wire.block_segment_parts(1, 2, 3, 1, b"h" * 32, b"d" * 11)),
                _capnp_segments(schema.TlogBlock, 1024, sequence=5, data=b"dd", hash=b"hh")[0],
                struct.pack("<QQ", 1 << 32, 7)]  # a smaller, older struct
    for segment in segments:
        yield ("parse_block", 0, (), segment)
    for response in responses:
        yield ("parse_response", 0, (), response[8:])  # the segment: no framing
    yield ("parse_response", 0, (), _capnp_segments(schema.TlogResponse, 1024, status=3,
                                                     sequences=[1, 2, 3])[0])
    yield ("encoders", 1, (32, 20, 0x0205, 8), bytes(range(200)))
    yield ("encoders", 2, (0, 0, 0x8003, 0), bytes(60))
