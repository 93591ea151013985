"""Sans-I/O core of the tlog wire protocol.

`ServerConnection` and `ClientConnection` are fed the bytes that arrived and
return the events they complete; their ``send_*`` methods return the bytes to
write. They know nothing of sockets or event loops, so the asyncio server, the
client, the tests and the fuzzers all drive the same code.

Framing (see docs/protocol.md): the client's first message is a bare
`HandshakeRequest` frame; every later client message is a message-type byte and
one frame. The server answers with one `HandshakeResponse` frame, then
`TlogResponse` frames. A frame is Cap'n Proto's unpacked stream framing.

The one bound that matters for memory is the maximum message size: a frame
whose segment table announces more is refused as soon as the table is read,
before its body is waited for.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import schema, wire
from .status import BlockStatus, HandshakeStatus, MessageType, Operation
from .version import CURRENT_VERSION
from .wire import Block, BlockResponse

#: Default bound on one message: a 64 KiB block with its hash and framing fits
#: with room to spare, while a hostile segment table cannot make us buffer more.
DEFAULT_MAX_MESSAGE_SIZE = 128 * 1024

HASH_SIZE = 32


def block_hash(data: bytes | memoryview) -> bytes:
    """BLAKE2b-256 of a block's data: what `TlogBlock.hash` must hold."""
    return hashlib.blake2b(data, digest_size=HASH_SIZE).digest()


class ProtocolError(Exception):
    """The peer broke the protocol; the connection cannot continue."""


# -- events --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Handshake:
    """A client's HandshakeRequest.

    ``token`` is our addition (field @4): the vdisk's access token, empty when the client
    sent none (every 0-Disk client). Kept out of ``repr`` so that it never reaches a log.
    ``continue_sequence`` (ours, @5): the client starts after the vdisk's last sequence.
    ``range_ops`` (ours, @6): the client may send range operations if the server takes them.
    """

    version: int
    vdisk_id: str
    first_sequence: int
    reset_first_sequence: bool
    token: bytes = field(default=b"", repr=False)
    continue_sequence: bool = False
    range_ops: bool = False


@dataclass(frozen=True, slots=True)
class ForceFlush:
    """ForceFlushAtSeq: flush everything pending once ``sequence`` is reached."""

    sequence: int


@dataclass(frozen=True, slots=True)
class WaitNbdSlaveSync:
    """WaitNbdSlaveSync command."""

    sequence: int = 0


@dataclass(frozen=True, slots=True)
class HandshakeResponse:
    """The server's answer to the handshake.

    Ours (fields @2-@5; a reference server leaves them unset): where the vdisk's log stood
    when the client connected, and the ``epoch`` its blocks go to. ``last_sequence`` is the
    highest sequence stored or received in order; ``has_log`` is False for a vdisk with
    nothing. ``slave_sync``: the server keeps a standby of the vdisk in step. ``range_ops``:
    the server takes range operations (answered only to a client that asked).
    """

    version: int
    status: HandshakeStatus | int
    last_sequence: int = 0
    has_log: bool = False
    epoch: int = 0
    slave_sync: bool = False
    range_ops: bool = False

    @property
    def next_sequence(self) -> int:
        """The sequence a client that continues the log sends next."""
        return self.last_sequence + 1 if self.has_log else 0


ServerEvent = Handshake | Block | ForceFlush | WaitNbdSlaveSync
ClientEvent = HandshakeResponse | BlockResponse


def _status(enum_type: type[enum.IntEnum], value: int) -> int:
    # The member on the pure path; compiled (mypyc), an int result is the plain number.
    try:
        return enum_type(value)
    except ValueError:
        return value  # an unknown status from a newer peer: keep the number


# -- the shared receive buffer ---------------------------------------------------


class _FrameReader:
    """An incremental reader of frames out of one growable buffer.

    Bytes go in either by `feed` (a copy) or, for an asyncio BufferedProtocol,
    straight into `get_buffer()` followed by `buffer_updated(n)`.
    """

    def __init__(self, max_message_size: int, initial_size: int = 16 * 1024,
                 read_size: int = 256 * 1024) -> None:
        if max_message_size < 64:
            raise ValueError("max_message_size must be at least 64 bytes")
        self.max_message_size = max_message_size
        # Starts small, so thousands of idle connections cost little (16 KiB each, not
        # 256); doubles while reads fill it, up to ``read_size``, and grows beyond that
        # only to fit the largest frame actually seen. Always grown by replacement.
        self._buf = bytearray(initial_size)
        self._view = memoryview(self._buf)
        self._read_size = max(read_size, initial_size)
        self._offered = 0  # size of the last view handed out by get_buffer
        self._start = 0  # first unparsed byte
        self._end = 0  # end of received bytes

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._end < len(self._buf) // 4:
            self._compact()
        view = self._view[self._end:]
        self._offered = len(view)
        return view

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        if nbytes == self._offered and len(self._buf) < self._read_size:
            self._grow(min(2 * len(self._buf), self._read_size))  # the peer sends a lot

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) > len(self._buf) - self._end:
            self._compact()
            if len(data) > len(self._buf) - self._end:
                self._grow(self._end + len(data))
        self._buf[self._end:self._end + len(data)] = data
        self._end += len(data)

    def _compact(self) -> None:
        # Same-length slice assignment: allowed even while views of the buffer exist.
        pending = self._end - self._start
        if self._start:
            self._buf[0:pending] = self._buf[self._start:self._end]
        self._start, self._end = 0, pending

    def _grow(self, size: int) -> None:
        # A new buffer rather than resizing in place: views of the old one (handed to the
        # event loop by get_buffer, or still held by a caller) stay valid.
        pending = self._end - self._start
        new = bytearray(max(size, 2 * len(self._buf)))
        new[0:pending] = self._buf[self._start:self._end]
        self._buf, self._view = new, memoryview(new)
        self._start, self._end = 0, pending

    @property
    def pending(self) -> int:
        return self._end - self._start

    def consume(self, parse: Callable[..., int], *args: Any) -> None:
        """Let ``parse(buf, start, end, *args)`` take whole messages off the front.

        The fast paths (wire.take_blocks, wire.take_responses) parse straight out of
        the buffer and return where the first message they left begins.
        """
        self._start = parse(self._buf, self._start, self._end, *args)

    def peek_byte(self) -> int | None:
        return self._buf[self._start] if self._end > self._start else None

    def next_frame(self, skip: int = 0) -> tuple[memoryview, tuple[int, ...]] | None:
        """The next whole frame after ``skip`` prefix bytes, consumed; None if incomplete.

        Returns a view of the body (valid until the next call) and segment sizes.
        """
        at = self._start + skip
        try:
            header = wire.parse_frame_header(self._buf, at, self._end - at, self.max_message_size)
        except wire.FrameError as exc:
            raise ProtocolError(str(exc)) from None
        if header is None:
            return None
        body_at = at + header.header_len
        body_end = body_at + header.body_len
        if body_end > self._end:
            if body_end - self._start > len(self._buf):
                self._grow(body_end - self._start)  # room for the whole frame
            return None
        self._start = body_end
        return self._view[body_at:body_end], header.segment_sizes


def _segments(body: memoryview, sizes: tuple[int, ...]) -> list[bytes]:
    out, at = [], 0
    for size in sizes:
        out.append(bytes(body[at:at + size]))
        at += size
    return out


def _read_struct(struct_type: object, body: memoryview, sizes: tuple[int, ...], what: str):  # type: ignore[no-untyped-def]
    try:
        return struct_type.from_segments(_segments(body, sizes))  # type: ignore[attr-defined]
    except Exception as exc:  # pycapnp raises KjException and friends
        raise ProtocolError(f"malformed {what}: {exc}") from None


class _State(enum.Enum):
    HANDSHAKE = "handshake"
    MESSAGES = "messages"
    ERROR = "error"


# -- server side -----------------------------------------------------------------


class ServerConnection:
    """The server's side of one connection: bytes in, client events out."""

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self._reader = _FrameReader(max_message_size)
        self._state = _State.HANDSHAKE
        self._error: ProtocolError | None = None

    @property
    def handshaken(self) -> bool:
        return self._state is _State.MESSAGES

    @property
    def errored(self) -> bool:
        return self._state is _State.ERROR

    @property
    def error(self) -> ProtocolError | None:
        """Why the connection failed, None while it has not. The events before the error
        were handed over first; the error itself is raised by the next call, or read here."""
        return self._error

    @property
    def buffered(self) -> int:
        """Bytes received and not yet part of a whole message."""
        return self._reader.pending

    # zero-copy input, for asyncio.BufferedProtocol
    def get_buffer(self, sizehint: int = -1) -> memoryview:
        return self._reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> list[ServerEvent]:
        self._reader.buffer_updated(nbytes)
        return self._events()

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ServerEvent]:
        """Feed received bytes; returns the events they complete, in order."""
        self._reader.feed(data)
        return self._events()

    def _events(self) -> list[ServerEvent]:
        if self._error is not None:
            raise self._error
        events: list[ServerEvent] = []
        reader = self._reader
        take = wire.take_blocks
        try:
            while True:
                if self._state is _State.MESSAGES:
                    # Blocks in the usual layout straight out of the buffer; anything
                    # else (and every error) goes through the generic path below.
                    reader.consume(take, reader.max_message_size, events.append)
                event = self._next_event()
                if event is None:
                    return events
                events.append(event)
        except ProtocolError as exc:
            self._state = _State.ERROR
            self._error = exc
            if events:
                return events  # hand over what was valid; the error surfaces on the next call
            raise

    def _next_event(self) -> ServerEvent | None:
        reader = self._reader
        if self._state is _State.HANDSHAKE:
            got = reader.next_frame()
            if got is None:
                return None
            req = _read_struct(schema.HandshakeRequest, *got, "HandshakeRequest")
            try:
                handshake = Handshake(req.version, req.vdiskID, req.firstSequence,
                                      req.resetFirstSequence, bytes(req.token),
                                      req.continueSequence, req.rangeOps)
            except Exception as exc:  # pycapnp reads lazily: bad pointers surface here
                raise ProtocolError(f"malformed HandshakeRequest: {exc}") from None
            self._state = _State.MESSAGES
            return handshake
        mtype = reader.peek_byte()
        if mtype is None:
            return None
        if mtype == MessageType.TLOG_BLOCK:
            got = reader.next_frame(skip=1)
            if got is None:
                return None
            return _decode_block(*got)
        if mtype in (MessageType.FORCE_FLUSH_AT_SEQ, MessageType.WAIT_NBD_SLAVE_SYNC):
            got = reader.next_frame(skip=1)
            if got is None:
                return None
            cmd = _read_struct(schema.Command, *got, "Command")
            if mtype == MessageType.FORCE_FLUSH_AT_SEQ:
                return ForceFlush(cmd.sequence)
            return WaitNbdSlaveSync(cmd.sequence)
        raise ProtocolError(f"unknown message type {mtype}")

    # -- bytes to send --
    @staticmethod
    def send_handshake_response(status: HandshakeStatus, version: int | None = None, *,
                                last_sequence: int = 0, has_log: bool = False,
                                epoch: int = 0, slave_sync: bool = False,
                                range_ops: bool = False) -> bytes:
        return wire.encode_handshake_response(
            CURRENT_VERSION.to_uint32() if version is None else version, int(status),
            last_sequence, has_log, epoch, slave_sync, range_ops)

    @staticmethod
    def send_response(status: BlockStatus, sequences: Sequence[int] = ()) -> bytes:
        return wire.encode_response(int(status), sequences)


def _decode_block(body: memoryview, sizes: tuple[int, ...]) -> Block:
    if len(sizes) == 1:
        seg = memoryview(bytes(body))  # our own copy: the receive buffer is reused
        block = wire.parse_block(seg)
        if block is not None:
            return block
    msg = _read_struct(schema.TlogBlock, body, sizes, "TlogBlock")
    try:
        return Block(msg.sequence, msg.index, msg.timestamp, msg.operation, msg.hash, msg.data)
    except Exception as exc:
        raise ProtocolError(f"malformed TlogBlock: {exc}") from None


# -- client side -----------------------------------------------------------------


class ClientConnection:
    """The client's side of one connection: encodes requests, decodes responses."""

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self._reader = _FrameReader(max_message_size)
        self._state = _State.HANDSHAKE

    @property
    def handshaken(self) -> bool:
        return self._state is _State.MESSAGES

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ClientEvent]:
        """Feed received bytes; returns the events they complete, in order."""
        reader = self._reader
        reader.feed(data)
        events: list[ClientEvent] = []
        if self._state is _State.ERROR:
            raise ProtocolError("connection already failed")
        try:
            while True:
                if self._state is _State.MESSAGES:
                    # Responses in the usual layout (one per block at full speed) by hand.
                    reader.consume(wire.take_responses, events.append)
                got = reader.next_frame()
                if got is None:
                    return events
                if self._state is _State.HANDSHAKE:
                    resp = _read_struct(schema.HandshakeResponse, *got, "HandshakeResponse")
                    try:
                        event = HandshakeResponse(
                            resp.version, _status(HandshakeStatus, resp.status),
                            resp.lastSequence, resp.hasLog, resp.epoch, resp.slaveSync,
                            resp.rangeOps)
                    except Exception as exc:
                        raise ProtocolError(f"malformed HandshakeResponse: {exc}") from None
                    self._state = _State.MESSAGES
                    events.append(event)
                    continue
                body, sizes = got
                parsed = wire.parse_response(body) if len(sizes) == 1 else None
                if parsed is None:
                    msg = _read_struct(schema.TlogResponse, body, sizes, "TlogResponse")
                    try:
                        parsed = (msg.status, list(msg.sequences))
                    except Exception as exc:  # pycapnp reads lazily: bad pointers surface here
                        raise ProtocolError(f"malformed TlogResponse: {exc}") from None
                events.append(BlockResponse(_status(BlockStatus, parsed[0]), tuple(parsed[1])))
        except ProtocolError:
            self._state = _State.ERROR
            raise

    @staticmethod
    def send_handshake(vdisk_id: str, first_sequence: int, reset_first_sequence: bool = False,
                       version: int | None = None, token: bytes | None = None,
                       continue_sequence: bool = False, range_ops: bool = False) -> bytes:
        """A HandshakeRequest frame; ``token`` (our field @4) only when given.

        Laid out by hand: without a token the bytes are exactly the Go client's (a struct
        with one pointer, as the reference schema has), so a server that predates the
        token field cannot tell us apart; with one, the struct has a second pointer, which
        such a server ignores. ``continue_sequence`` (@5) and ``range_ops`` (@6) are more
        bits of the data section, which such a server does not read either.
        """
        return wire.encode_handshake(CURRENT_VERSION.to_uint32() if version is None else version,
                                vdisk_id, first_sequence, reset_first_sequence, token,
                                continue_sequence, range_ops)

    @staticmethod
    def send_block(sequence: int, index: int, timestamp: int, data: bytes | memoryview,
                   operation: int = Operation.SET, hash: bytes | None = None) -> bytes:
        """A TlogBlock message; ``hash`` defaults to the BLAKE2b-256 of ``data``.

        Runs once per vdisk write: one copy of the data, laid out as the Go client does.
        """
        digest = block_hash(data) if hash is None else hash
        return wire.encode_block_message(sequence, index, timestamp, int(operation), digest, data)

    @staticmethod
    def send_force_flush(sequence: int) -> bytes:
        return _command(MessageType.FORCE_FLUSH_AT_SEQ, sequence)

    @staticmethod
    def send_wait_nbd_slave_sync() -> bytes:
        return _command(MessageType.WAIT_NBD_SLAVE_SYNC, 0)


def _command(mtype: MessageType, sequence: int) -> bytes:
    msg = schema.Command.new_message()
    msg.type = int(mtype)
    msg.sequence = sequence
    return bytes((mtype,)) + bytes(msg.to_bytes())
