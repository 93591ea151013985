"""Cap'n Proto stream framing, and hand-written layouts of the hot messages.

The blocks and responses of the tlog protocol are built and parsed here word
by word instead of through pycapnp: decoding a block with pycapnp costs more
than the whole per-block budget of the server. Only single-segment messages
with near pointers take this path; the callers fall back to pycapnp (see
``tlog.protocol.schema``) for anything else, so every valid encoding is still accepted.

Layouts (word = 8 bytes, offsets in words), as a Cap'n Proto compiler lays out
the structs of ``schema/tlog_schema.capnp``:

- TlogBlock: data section of 4 words (sequence u64, index i64, timestamp u64,
  operation u8 at byte 24), 2 pointers (hash, data).
- TlogResponse: data section of 1 word (status i8), 1 pointer (sequences).
- HandshakeResponse: data section of 1 word (version u32, status i8 at byte 4), as the
  reference sends it; 3 words when our fields are set (lastSequence u64 in word 1,
  hasLog at bit 40, epoch u64 in word 2).
- TlogAggregation: data section of 2 words (size, timestamp), 4 pointers
  (name, vdiskID, blocks, prev); 3 data words when our epoch (word 2) is set.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

_U32 = struct.Struct("<I")
_U32X2 = struct.Struct("<II")
_U64 = struct.Struct("<Q")
_BLOCK_DATA = struct.Struct("<QqQB")  # sequence, index, timestamp, operation
_BLOCK_DATA_WORDS = 4
_BLOCK_PTRS = 2
_WORD = 8

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
    body_len = sum(sizes) * _WORD
    if body_len > max_size:
        raise FrameError(f"frame announces {body_len} bytes (limit {max_size})")
    return FrameHeader(header_len, body_len, tuple(s * _WORD for s in sizes))


def frame(segment: bytes | bytearray | memoryview) -> bytes:
    """Wrap one segment in stream framing."""
    return _U32X2.pack(0, len(segment) // _WORD) + bytes(segment)


def _struct_root(seg: memoryview | bytes, seg_words: int) -> tuple[int, int, int] | None:
    """(start word, data words, pointer count) of the root struct, or None if not a near one."""
    if seg_words < 1:
        return None
    word = _U64.unpack_from(seg, 0)[0]
    if word == 0:
        return (1, 0, 0)  # null root: every field reads as its default
    if word & 3 != 0:
        return None
    offset = _signed30(word >> 2)
    start = 1 + offset
    data_words = (word >> 32) & 0xFFFF
    ptrs = word >> 48
    if start < 1 or start + data_words + ptrs > seg_words:
        return None
    return (start, data_words, ptrs)


def _signed30(value: int) -> int:
    value &= 0x3FFFFFFF
    return value - (1 << 30) if value & (1 << 29) else value


def _byte_list(seg: memoryview | bytes, seg_words: int, ptr_word: int) -> tuple[int, int] | None:
    """(byte offset, length) of the Data list at pointer ``ptr_word``; None if not plain."""
    word = _U64.unpack_from(seg, ptr_word * _WORD)[0]
    if word == 0:
        return (0, 0)
    if word & 3 != 1 or (word >> 32) & 7 != 2:
        return None
    start = ptr_word + 1 + _signed30(word >> 2)
    length = word >> 35
    if start < 0 or start * _WORD + length > seg_words * _WORD:
        return None
    return (start * _WORD, length)


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
    seg_words = len(seg) // _WORD
    root = _struct_root(seg, seg_words)
    if root is None:
        return None
    start, data_words, ptrs = root
    base = start * _WORD
    if data_words >= _BLOCK_DATA_WORDS:
        sequence, index, timestamp, operation = _BLOCK_DATA.unpack_from(seg, base)
    else:
        # A smaller (older) struct: missing fields read as zero.
        raw = bytes(seg[base:base + data_words * _WORD]).ljust(_BLOCK_DATA.size, b"\0")
        sequence, index, timestamp, operation = _BLOCK_DATA.unpack_from(raw)
    views = []
    for i in range(_BLOCK_PTRS):
        if i >= ptrs:
            views.append(seg[0:0])
            continue
        loc = _byte_list(seg, seg_words, start + data_words + i)
        if loc is None:
            return None
        views.append(seg[loc[0]:loc[0] + loc[1]])
    return Block(sequence, index, timestamp, operation, views[0], views[1])


# The fast path for the message that dominates the traffic: a block message (type byte 1)
# in one segment, laid out as the Go client and ours lay it out: root struct right after
# the root pointer, 4 data words, hash (32 bytes) then data right after the pointers.
_BLOCK_MSG_HEAD = struct.Struct("<BIIQQqQQQQ")  # type, seg count-1, words, 7 words
_CANON_ROOT = (_BLOCK_DATA_WORDS << 32) | (_BLOCK_PTRS << 48)
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


def _pad(n: int) -> int:
    return (-n) & 7


def _list_ptr(ptr_word: int, target_word: int, elem_size: int, count: int) -> int:
    offset = (target_word - ptr_word - 1) & 0x3FFFFFFF
    return 1 | (offset << 2) | (elem_size << 32) | (count << 35)


_ZEROS = bytes(8)
_BYTE_LIST = 1 | (2 << 32)  # a list pointer's tag and element size (bytes), no offset or count


def block_segment_parts(sequence: int, index: int, timestamp: int, operation: int,
                        hash_: bytes | memoryview,
                        data: bytes | memoryview) -> list[bytes | memoryview]:
    """The segment of a TlogBlock, as pycapnp/Go lay it out: struct, hash, data."""
    hash_words = (len(hash_) + 7) // 8
    # root pointer (word 0) -> struct at word 1; pointers at words 5 and 6.
    head = struct.pack(
        "<QQqQQQQ",
        (_BLOCK_DATA_WORDS << 32) | (_BLOCK_PTRS << 48),
        sequence, index, timestamp, operation,
        _list_ptr(5, 7, 2, len(hash_)),
        _list_ptr(6, 7 + hash_words, 2, len(data)),
    )
    return [head, hash_, _ZEROS[:_pad(len(hash_))], data, _ZEROS[:_pad(len(data))]]


def encode_block_frame(sequence: int, index: int, timestamp: int, operation: int,
                       hash_: bytes | memoryview, data: bytes | memoryview) -> bytes:
    """A whole framed TlogBlock message (without the message-type byte)."""
    parts = block_segment_parts(sequence, index, timestamp, operation, hash_, data)
    size = sum(len(p) for p in parts)
    return b"".join([_U32X2.pack(0, size // _WORD), *parts])


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
        _list_ptr(2, 3, 5, n),
        *sequences,
    )


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


def parse_response(seg: memoryview) -> tuple[int, list[int]] | None:
    """(status, sequences) of a single-segment TlogResponse, or None for pycapnp."""
    seg_words = len(seg) // _WORD
    root = _struct_root(seg, seg_words)
    if root is None:
        return None
    start, data_words, ptrs = root
    status = struct.unpack_from("<b", seg, start * _WORD)[0] if data_words else 0
    if ptrs < 1:
        return status, []
    ptr_word = start + data_words
    word = _U64.unpack_from(seg, ptr_word * _WORD)[0]
    if word == 0:
        return status, []
    if word & 3 != 1 or (word >> 32) & 7 != 5:
        return None
    first = ptr_word + 1 + _signed30(word >> 2)
    count = word >> 35
    if first < 0 or first + count > seg_words:
        return None
    return status, list(struct.unpack_from(f"<{count}Q", seg, first * _WORD))


# -- aggregations --------------------------------------------------------------

_AGG_DATA_WORDS = 2
_AGG_PTRS = 4


def _text_words(text: bytes) -> int:
    return (len(text) + 1 + 7) // 8  # NUL terminated


def encode_aggregation(name: str, timestamp: int, vdisk_id: str, prev: bytes,
                       blocks: Sequence[BlockFields] | Iterable[BlockFields],
                       epoch: int = 0) -> bytes:
    """A framed single-segment TlogAggregation.

    The layout is the one pycapnp and the Go server produce when the fields are
    set in the order name, size, timestamp, prev, vdiskID, blocks (each block's
    hash before its data): so the legacy writer is byte-identical to the Go one.
    A non-zero ``epoch`` (our field @6) adds a third data word.
    """
    return b"".join(aggregation_parts(name, timestamp, vdisk_id, prev, blocks, epoch))


def aggregation_parts(name: str, timestamp: int, vdisk_id: str, prev: bytes,
                      blocks: Sequence[BlockFields] | Iterable[BlockFields],
                      epoch: int = 0) -> list[Buffer]:
    """The pieces `encode_aggregation` joins, in order (the blocks' data among them, not
    copied): for a caller that copies a large aggregation together in steps."""
    blocks = list(blocks)
    name_b = name.encode()
    vdisk_b = vdisk_id.encode()
    n = len(blocks)
    data_words = _AGG_DATA_WORDS + (1 if epoch else 0)
    # Word positions inside the segment.
    agg_start = 1
    name_at = agg_start + data_words + _AGG_PTRS
    prev_at = name_at + _text_words(name_b)
    vdisk_at = prev_at + (len(prev) + 7) // 8
    tag_at = vdisk_at + _text_words(vdisk_b)
    elems_at = tag_at + 1
    elem_words = _BLOCK_DATA_WORDS + _BLOCK_PTRS
    tail_at = elems_at + n * elem_words
    ptr0 = agg_start + data_words  # word of the name pointer
    head = struct.pack(
        "<QQQ" + "Q" * (data_words - _AGG_DATA_WORDS) + "QQQQ",
        (data_words << 32) | (_AGG_PTRS << 48),
        n, timestamp,
        *((epoch,) if epoch else ()),
        _list_ptr(ptr0, name_at, 2, len(name_b) + 1),
        _list_ptr(ptr0 + 1, vdisk_at, 2, len(vdisk_b) + 1),
        _list_ptr(ptr0 + 2, tag_at, 7, n * elem_words),
        _list_ptr(ptr0 + 3, prev_at, 2, len(prev)),
    )
    parts: list[Buffer] = [
        head,
        name_b, _ZEROS[:_text_words(name_b) * 8 - len(name_b)],
        prev, _ZEROS[:_pad(len(prev))],
        vdisk_b, _ZEROS[:_text_words(vdisk_b) * 8 - len(vdisk_b)],
        # composite list tag: a struct "pointer" whose offset is the element count
        _U64.pack((n << 2) | (_BLOCK_DATA_WORDS << 32) | (_BLOCK_PTRS << 48)),
    ]
    elems: list[bytes] = []
    tail: list[Buffer] = []
    at = tail_at
    pack_elem = struct.Struct("<QqQQQQ").pack
    append, extend = elems.append, tail.extend
    hash_ptr_word = elems_at + _BLOCK_DATA_WORDS - elem_words
    for b in blocks:
        hash_ptr_word += elem_words
        h, d = b.hash, b.data
        hash_len, data_len = len(h), len(d)
        if hash_len == 32 and data_len and not data_len & 7:
            # the usual block, laid out as _list_ptr would (both targets lie ahead)
            data_at = at + 4
            append(pack_elem(
                b.sequence, b.index, b.timestamp, b.operation,
                _BYTE_LIST | ((at - hash_ptr_word - 1) << 2) | (32 << 35),
                _BYTE_LIST | ((data_at - hash_ptr_word - 2) << 2) | (data_len << 35)))
            extend((h, d))
            at = data_at + (data_len >> 3)
            continue
        data_at = at + (hash_len + 7) // 8
        append(pack_elem(
            b.sequence, b.index, b.timestamp, b.operation,
            _list_ptr(hash_ptr_word, at, 2, hash_len) if hash_len else 0,
            _list_ptr(hash_ptr_word + 1, data_at, 2, data_len) if data_len else 0,
        ))
        extend((h, _ZEROS[:_pad(hash_len)], d, _ZEROS[:_pad(data_len)]))
        at = data_at + (data_len + 7) // 8
    parts.extend(elems)
    parts.extend(tail)
    return [_U32X2.pack(0, at), *parts]


class RawAggregation(NamedTuple):
    """The fields of a stored TlogAggregation; block hashes and data are views."""

    name: str
    size: int
    timestamp: int
    vdisk_id: str
    prev: bytes
    blocks: list[Block]
    epoch: int = 0


def _text(seg: memoryview, seg_words: int, ptr_word: int) -> str | None:
    loc = _byte_list(seg, seg_words, ptr_word)
    if loc is None:
        return None
    off, length = loc
    if length == 0:
        return ""
    return bytes(seg[off:off + length - 1]).decode("utf-8", "replace")


#: Struct of ``count`` canonical aggregation elements (4 data words, 2 pointers), by count.
_ELEMS: dict[int, struct.Struct] = {}
_BYTES_PTR_MASK = 0x7_0000_0003  # pointer kind (2 bits) and list element size (3 bits)
_BYTES_PTR = 0x2_0000_0001  # a list pointer to bytes


def _elements(count: int) -> struct.Struct:
    found = _ELEMS.get(count)
    if found is None:
        found = struct.Struct("<" + "QqQQQQ" * count)
        if len(_ELEMS) < 4096:
            _ELEMS[count] = found
    return found


def _canonical_blocks(seg: memoryview, seg_words: int, first: int,
                      count: int) -> list[Block] | None:
    """The blocks of a composite list whose elements are TlogBlocks of exactly 4 data words
    and 2 pointers (every writer's layout), elements starting at word ``first``.

    One unpack reads every element; each pointer is then checked and resolved with a few
    integer operations (a restore parses every block it replays: this is its hot loop).
    None when a pointer is not a plain byte list inside the segment (pycapnp decides).
    """
    values = _elements(count).unpack_from(seg, first * _WORD)
    limit = seg_words * _WORD
    blocks: list[Block] = []
    append = blocks.append
    ptr_word = first + _BLOCK_DATA_WORDS  # word of the first element's hash pointer
    for i in range(0, 6 * count, 6):
        hp = values[i + 4]
        dp = values[i + 5]
        if hp:
            if hp & _BYTES_PTR_MASK != _BYTES_PTR:
                return None
            off = (hp >> 2) & 0x3FFFFFFF
            start = (ptr_word + 1 + (off - (1 << 30) if off & (1 << 29) else off)) * _WORD
            stop = start + (hp >> 35)
            if start < 0 or stop > limit:
                return None
            hash_view = seg[start:stop]
        else:
            hash_view = seg[0:0]
        if dp:
            if dp & _BYTES_PTR_MASK != _BYTES_PTR:
                return None
            off = (dp >> 2) & 0x3FFFFFFF
            start = (ptr_word + 2 + (off - (1 << 30) if off & (1 << 29) else off)) * _WORD
            stop = start + (dp >> 35)
            if start < 0 or stop > limit:
                return None
            data_view = seg[start:stop]
        else:
            data_view = seg[0:0]
        append(Block(values[i], values[i + 1], values[i + 2], values[i + 3] & 0xFF,
                     hash_view, data_view))
        ptr_word += 6
    return blocks


def parse_aggregation(seg: memoryview) -> RawAggregation | None:
    """Parse a single-segment TlogAggregation in place; None means "use pycapnp"."""
    seg_words = len(seg) // _WORD
    root = _struct_root(seg, seg_words)
    if root is None:
        return None
    start, data_words, ptrs = root
    if data_words < _AGG_DATA_WORDS or ptrs < _AGG_PTRS:
        return None
    size, timestamp = struct.unpack_from("<QQ", seg, start * _WORD)
    epoch = _U64.unpack_from(seg, (start + 2) * _WORD)[0] if data_words > 2 else 0
    p0 = start + data_words
    name = _text(seg, seg_words, p0)
    vdisk = _text(seg, seg_words, p0 + 1)
    prev_loc = _byte_list(seg, seg_words, p0 + 3)
    if name is None or vdisk is None or prev_loc is None:
        return None
    prev = bytes(seg[prev_loc[0]:prev_loc[0] + prev_loc[1]])
    word = _U64.unpack_from(seg, (p0 + 2) * _WORD)[0]
    blocks: list[Block] = []
    if word != 0:
        if word & 3 != 1 or (word >> 32) & 7 != 7:
            return None
        tag_at = p0 + 2 + 1 + _signed30(word >> 2)
        total_words = word >> 35
        if tag_at < 0 or tag_at + 1 + total_words > seg_words:
            return None
        tag = _U64.unpack_from(seg, tag_at * _WORD)[0]
        if tag & 3 != 0:
            return None
        count = (tag >> 2) & 0x3FFFFFFF
        dw = (tag >> 32) & 0xFFFF
        pc = tag >> 48
        elem = dw + pc
        if count * elem > total_words or dw < 1:
            return None
        if dw == _BLOCK_DATA_WORDS and pc == _BLOCK_PTRS:
            canonical = _canonical_blocks(seg, seg_words, tag_at + 1, count)
            if canonical is None:
                return None
            return RawAggregation(name or "", size, timestamp, vdisk or "", prev, canonical,
                                  epoch)
        for i in range(count):
            at = tag_at + 1 + i * elem
            raw = bytes(seg[at * _WORD:(at + dw) * _WORD]).ljust(_BLOCK_DATA.size, b"\0")
            sequence, index, ts, op = _BLOCK_DATA.unpack_from(raw)
            views = []
            for j in range(_BLOCK_PTRS):
                if j >= pc:
                    views.append(seg[0:0])
                    continue
                loc = _byte_list(seg, seg_words, at + dw + j)
                if loc is None:
                    return None
                views.append(seg[loc[0]:loc[0] + loc[1]])
            blocks.append(Block(sequence, index, ts, op, views[0], views[1]))
    return RawAggregation(name or "", size, timestamp, vdisk or "", prev, blocks, epoch)
