"""Cap'n Proto stream framing, and hand-written layouts of the protocol's messages, both
sides: what a server reads and writes, what a client writes and reads.

The blocks and responses of the tlog protocol are built and parsed here word
by word instead of through pycapnp: decoding a block with pycapnp costs more
than the whole per-block budget of the server. Only single-segment messages
with near pointers take this path; the callers fall back to pycapnp (see
``tlog.protocol.schema``) for anything else, so every valid encoding is still accepted.
The words and pointers themselves are `tlog.protocol.pointers`'; the stored aggregation's
layout (a record, not a message) is `tlog.record.layout`'s.

Layouts (word = 8 bytes, offsets in words), as a Cap'n Proto compiler lays out
the structs of ``schema/tlog_schema.capnp``:

- TlogBlock: data section of 4 words (sequence u64, index i64, timestamp u64,
  operation u8 at byte 24), 2 pointers (hash, data).
- TlogResponse: data section of 1 word (status i8), 1 pointer (sequences).
- HandshakeRequest: data section of 2 words (version u32, resetFirstSequence at bit 32,
  continueSequence at bit 33, rangeOps at bit 34; firstSequence u64), 1 pointer (vdiskID),
  2 when our token is set.
- HandshakeResponse: data section of 1 word (version u32, status i8 at byte 4), as the
  reference sends it; 3 words when our fields are set (lastSequence u64 in word 1,
  hasLog at bit 40, epoch u64 in word 2).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from typing import NamedTuple

from .pointers import U32X2, U64, WORD, ZEROS, byte_list, list_ptr, pad, signed30, struct_root
from .status import BlockStatus

_U32 = struct.Struct("<I")
#: A TlogBlock's data section (sequence, index, timestamp, operation), its words, its
#: pointers (hash, data): the blocks of a message and of a stored aggregation alike.
BLOCK_DATA = struct.Struct("<QqQB")
BLOCK_DATA_WORDS = 4
BLOCK_PTRS = 2

#: Most segments a frame may announce. Our peers always send one; a frame
#: announcing thousands is an attack on the segment table, not a message.
MAX_SEGMENTS = 64


class FrameError(ValueError):
    """A frame that is not valid Cap'n Proto stream framing, or breaks a limit."""


class FrameHeader(NamedTuple):
    header_len: int  # bytes of segment table, padding included
    body_len: int  # bytes of all segments
    segment_sizes: tuple[int, ...]  # in bytes


def parse_frame_header(buf: bytes | bytearray | memoryview, offset: int, available: int,
                       max_size: int) -> FrameHeader | None:
    """Read the segment table at ``offset``; None if more bytes are needed.

    Raises FrameError when the table announces too many segments or a body
    larger than ``max_size`` bytes: both are checked before a byte of the body
    is waited for, so a peer cannot make us buffer gigabytes.
    """
    if available < 4:
        return None
    count = _U32.unpack_from(buf, offset)[0] + 1
    if count > MAX_SEGMENTS:
        raise FrameError(f"frame announces {count} segments (at most {MAX_SEGMENTS})")
    header_len = (4 + 4 * count + 7) & ~7
    if available < header_len:
        return None
    sizes = struct.unpack_from(f"<{count}I", buf, offset + 4)
    body_len = sum(sizes) * WORD
    if body_len > max_size:
        raise FrameError(f"frame announces {body_len} bytes (limit {max_size})")
    return FrameHeader(header_len, body_len, tuple(s * WORD for s in sizes))


def frame(segment: bytes | bytearray | memoryview) -> bytes:
    """Wrap one segment in stream framing."""
    return U32X2.pack(0, len(segment) // WORD) + bytes(segment)


# -- blocks: parsed in place, laid out as the Go client lays them out --------------------

#: What block hashes and data may be: copies (bytes, bytearray) or views into one.
Buffer = bytes | bytearray | memoryview


class Block:
    """One TlogBlock. ``hash`` and ``data`` are views into a private copy of its bytes."""

    __slots__ = ("sequence", "index", "timestamp", "operation", "hash", "data")

    def __init__(self, sequence: int, index: int, timestamp: int, operation: int,
                 hash: Buffer, data: Buffer) -> None:
        self.sequence = sequence
        self.index = index
        self.timestamp = timestamp
        self.operation = operation
        self.hash = hash
        self.data = data

    def hash_ok(self) -> bool:
        """Whether ``hash`` is the BLAKE2b-256 of ``data``."""
        return (len(self.hash) == 32
                and hashlib.blake2b(self.data, digest_size=32).digest() == self.hash)

    def __repr__(self) -> str:
        return (f"Block(sequence={self.sequence}, index={self.index}, timestamp={self.timestamp},"
                f" operation={self.operation}, data=<{len(self.data)} bytes>)")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Block):
            return NotImplemented
        return (self.sequence, self.index, self.timestamp, self.operation, bytes(self.hash),
                bytes(self.data)) == (other.sequence, other.index, other.timestamp,
                                      other.operation, bytes(other.hash), bytes(other.data))

    __hash__ = None  # type: ignore[assignment]


#: What an aggregation stores of a block: any object with Block's attributes.
BlockFields = Block


def parse_block(seg: memoryview) -> Block | None:
    """Parse a single-segment TlogBlock in place; None means "use pycapnp instead"."""
    seg_words = len(seg) // WORD
    root = struct_root(seg, seg_words)
    if root is None:
        return None
    start, data_words, ptrs = root
    base = start * WORD
    if data_words >= BLOCK_DATA_WORDS:
        sequence, index, timestamp, operation = BLOCK_DATA.unpack_from(seg, base)
    else:
        # A smaller (older) struct: missing fields read as zero.
        raw = bytes(seg[base:base + data_words * WORD]).ljust(BLOCK_DATA.size, b"\0")
        sequence, index, timestamp, operation = BLOCK_DATA.unpack_from(raw)
    views = []
    for i in range(BLOCK_PTRS):
        if i >= ptrs:
            views.append(seg[0:0])
            continue
        loc = byte_list(seg, seg_words, start + data_words + i)
        if loc is None:
            return None
        views.append(seg[loc[0]:loc[0] + loc[1]])
    return Block(sequence, index, timestamp, operation, views[0], views[1])


# The fast path for the message that dominates the traffic: a block message (type byte 1)
# in one segment, laid out as the Go client and ours lay it out: root struct right after
# the root pointer, 4 data words, hash (32 bytes) then data right after the pointers.
_BLOCK_MSG_HEAD = struct.Struct("<BIIQQqQQQQ")  # type, seg count-1, words, 7 words
_CANON_ROOT = (BLOCK_DATA_WORDS << 32) | (BLOCK_PTRS << 48)
_CANON_HASH_PTR = 1 | (1 << 2) | (2 << 32) | (32 << 35)  # word 5 -> word 7, bytes, 32
_CANON_DATA_PTR_LOW = 1 | (4 << 2) | (2 << 32)  # word 6 -> word 11, bytes
_DATA_AT = 9 + 88  # message offset of the data: type, table, 11 words
#: Bytes of a block message besides its data and the data's padding (32-byte hash).
BLOCK_MESSAGE_OVERHEAD = _DATA_AT


def take_blocks(buf: bytearray, at: int, end: int, max_size: int,
                append: Callable[[Block], object], most: int = -1) -> int:
    """Canonically laid-out block messages from ``at`` on, each handed to ``append`` (at
    most ``most``; -1: all there are); the offset after the last one taken.

    Stops at the first message that differs (another layout, an incomplete or oversized
    frame, another message type): the generic path then decides. Hashes and data are
    copied out of ``buf``, which the caller reuses. One call for a whole read of blocks:
    the server's hot loop.
    """
    unpack = _BLOCK_MSG_HEAD.unpack_from
    while most and end - at >= _DATA_AT:
        (mtype, nseg, words, root, sequence, index, timestamp, opword, hash_ptr,
         data_ptr) = unpack(buf, at)
        if (mtype != 1 or nseg != 0 or root != _CANON_ROOT or hash_ptr != _CANON_HASH_PTR
                or data_ptr & 0x7FFFFFFFF != _CANON_DATA_PTR_LOW):
            break
        body = words << 3
        length = data_ptr >> 35
        stop = at + 9 + body
        if body > max_size or stop > end or 88 + length > body:
            break
        data_at = at + _DATA_AT
        append(Block(sequence, index, timestamp, opword & 0xFF, buf[data_at - 32:data_at],
                     buf[data_at:data_at + length]))
        at = stop
        most -= 1
    return at


def take_block(buf: bytearray, at: int, end: int, max_size: int) -> tuple[Block, int] | None:
    """One block as `take_blocks` takes it: (block, offset after it), or None."""
    out: list[Block] = []
    stop = take_blocks(buf, at, end, max_size, out.append, 1)
    return (out[0], stop) if out else None


def block_segment_parts(sequence: int, index: int, timestamp: int, operation: int,
                        hash_: bytes | memoryview,
                        data: bytes | memoryview) -> list[bytes | memoryview]:
    """The segment of a TlogBlock, as pycapnp/Go lay it out: struct, hash, data."""
    hash_words = (len(hash_) + 7) // 8
    # root pointer (word 0) -> struct at word 1; pointers at words 5 and 6.
    head = struct.pack(
        "<QQqQQQQ",
        (BLOCK_DATA_WORDS << 32) | (BLOCK_PTRS << 48),
        sequence, index, timestamp, operation,
        list_ptr(5, 7, 2, len(hash_)),
        list_ptr(6, 7 + hash_words, 2, len(data)),
    )
    return [head, hash_, ZEROS[:pad(len(hash_))], data, ZEROS[:pad(len(data))]]


def encode_block_frame(sequence: int, index: int, timestamp: int, operation: int,
                       hash_: bytes | memoryview, data: bytes | memoryview) -> bytes:
    """A whole framed TlogBlock message (without the message-type byte)."""
    parts = block_segment_parts(sequence, index, timestamp, operation, hash_, data)
    size = sum(len(p) for p in parts)
    return b"".join([U32X2.pack(0, size // WORD), *parts])


_BLOCK_MSG_PACK = struct.Struct("<BIIQQqQQQQ").pack
_PADS = tuple(bytes(n) for n in range(8))


def encode_block_message(sequence: int, index: int, timestamp: int, operation: int,
                         hash_: bytes | memoryview, data: bytes | memoryview) -> bytes:
    """A whole TlogBlock message, type byte included, with one copy of the data."""
    if len(hash_) != 32:
        return bytes((1,)) + encode_block_frame(sequence, index, timestamp, operation, hash_,
                                                data)
    n = len(data)
    head = _BLOCK_MSG_PACK(1, 0, 11 + ((n + 7) >> 3), _CANON_ROOT, sequence, index, timestamp,
                           operation, _CANON_HASH_PTR, _CANON_DATA_PTR_LOW | (n << 35))
    return b"".join((head, hash_, data, _PADS[-n & 7]))


# -- responses: the server's answers, laid out and taken back ---------------------------


class BlockResponse(NamedTuple):
    """A TlogResponse: a status about some sequences.

    A named tuple: the client receives one per block, and tuples are the cheapest
    objects Python builds; ``status, sequences = response`` works too.
    """

    status: BlockStatus | int
    sequences: tuple[int, ...]


_ONE_RESPONSE = struct.Struct("<IIQQQQ").pack
_ONE_SEQUENCE_LIST = 1 | (5 << 32) | (1 << 35)  # list pointer: next word, 8-byte elements, 1


def recv_ok(sequence: int) -> bytes:
    """``RecvOK [sequence]``, the answer to every block (what `encode_response` gives)."""
    return _ONE_RESPONSE(0, 4, (1 << 32) | (1 << 48), 1, _ONE_SEQUENCE_LIST, sequence)


def encode_response(status: int, sequences: Sequence[int]) -> bytes:
    """A framed TlogResponse; the sequence list is empty, never null, like the reference's."""
    n = len(sequences)
    if n == 1:  # every RecvOK: packed without building a format
        return _ONE_RESPONSE(0, 4, (1 << 32) | (1 << 48), status & 0xFF, _ONE_SEQUENCE_LIST,
                             sequences[0])
    return struct.pack(
        f"<IIQQQ{n}Q",
        0, 3 + n,
        (1 << 32) | (1 << 48),  # struct: 1 data word, 1 pointer
        status & 0xFF,
        list_ptr(2, 3, 5, n),
        *sequences,
    )


def parse_response(seg: memoryview) -> tuple[int, list[int]] | None:
    """(status, sequences) of a single-segment TlogResponse, or None for pycapnp."""
    seg_words = len(seg) // WORD
    root = struct_root(seg, seg_words)
    if root is None:
        return None
    start, data_words, ptrs = root
    status = struct.unpack_from("<b", seg, start * WORD)[0] if data_words else 0
    if ptrs < 1:
        return status, []
    ptr_word = start + data_words
    word = U64.unpack_from(seg, ptr_word * WORD)[0]
    if word == 0:
        return status, []
    if word & 3 != 1 or (word >> 32) & 7 != 5:
        return None
    first = ptr_word + 1 + signed30(word >> 2)
    count = word >> 35
    if first < 0 or first + count > seg_words:
        return None
    return status, list(struct.unpack_from(f"<{count}Q", seg, first * WORD))


_BLOCK_STATUS = {int(s): s for s in BlockStatus}
_Q3 = struct.Struct("<QQQ")
_RESPONSE_ROOT = (1 << 32) | (1 << 48)  # 1 data word, 1 pointer, right after the root
_SEQ_LIST_LOW = 1 | (5 << 32)  # list pointer, offset 0, 8-byte elements
_LOW35 = (1 << 35) - 1
_RECV_OK_HEAD = encode_response(BlockStatus.RECV_OK, [0])[:32]


def take_responses(buf: bytearray, at: int, end: int,
                   append: Callable[[BlockResponse], object]) -> int:
    """Responses in the usual single-segment layout from ``at`` on, each handed to
    ``append``; the offset after the last one taken (the client's hot loop, as
    `take_blocks` is the server's). Stops at the first that differs: pycapnp decides."""
    while end - at >= 40:
        if buf[at:at + 32] == _RECV_OK_HEAD:
            append(BlockResponse(BlockStatus.RECV_OK, U64.unpack_from(buf, at + 32)))
            at += 40
            continue
        nseg, words = U32X2.unpack_from(buf, at)
        size = 8 + (words << 3)
        if nseg != 0 or words < 3 or end - at < size:
            break
        root, word, ptr = _Q3.unpack_from(buf, at + 8)
        count = ptr >> 35
        if root != _RESPONSE_ROOT or ptr & _LOW35 != _SEQ_LIST_LOW or words != 3 + count:
            break
        status = word & 0xFF
        status = status - 256 if status > 127 else status
        append(BlockResponse(_BLOCK_STATUS.get(status, status),
                             struct.unpack_from(f"<{count}Q", buf, at + 32)))
        at += size
    return at


# -- handshakes ------------------------------------------------------------------------

#: version u32, resetFirstSequence (bit 32), continueSequence (bit 33), rangeOps (bit 34);
#: firstSequence u64
_HANDSHAKE_DATA_WORDS = 2


def encode_handshake(version: int, vdisk_id: str, first_sequence: int,
                     reset_first_sequence: bool = False, token: bytes | None = None,
                     continue_sequence: bool = False, range_ops: bool = False) -> bytes:
    """A framed HandshakeRequest: the vdisk id as NUL-terminated text, then the token."""
    text = vdisk_id.encode("utf-8") + b"\0"
    ptrs = 2 if token else 1
    text_at = 1 + _HANDSHAKE_DATA_WORDS + ptrs  # word of the text, after root and struct
    text_words = (len(text) + 7) // 8
    words = [
        (_HANDSHAKE_DATA_WORDS << 32) | (ptrs << 48),  # root: struct right after it
        (version & 0xFFFFFFFF) | ((1 << 32) if reset_first_sequence else 0)
        | ((1 << 33) if continue_sequence else 0) | ((1 << 34) if range_ops else 0),
        first_sequence,
        list_ptr(3, text_at, 2, len(text)),
    ]
    tail = [text, bytes(-len(text) & 7)]
    if token:
        token = bytes(token)
        words.append(list_ptr(4, text_at + text_words, 2, len(token)))
        tail += [token, bytes(-len(token) & 7)]
    body = struct.pack(f"<{len(words)}Q", *words) + b"".join(tail)
    return struct.pack("<II", 0, len(body) // 8) + body


def encode_handshake_response(version: int, status: int, last_sequence: int = 0,
                              has_log: bool = False, epoch: int = 0,
                              slave_sync: bool = False, range_ops: bool = False) -> bytes:
    """A framed HandshakeResponse: the reference's bytes when our fields are all unset.
    hasLog (@3), slaveSync (@5) and rangeOps (@6) are bits 0, 1 and 2 of byte 5 of the
    first data word."""
    if not (last_sequence or has_log or epoch or slave_sync or range_ops):
        return struct.pack("<IIQIbxxx", 0, 2, 1 << 32, version, status)
    bits = (1 if has_log else 0) | (2 if slave_sync else 0) | (4 if range_ops else 0)
    return struct.pack("<IIQIbBxxQQ", 0, 4, 3 << 32, version, status, bits, last_sequence,
                       epoch)
