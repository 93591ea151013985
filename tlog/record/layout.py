"""The layout of a stored aggregation: a TlogAggregation Cap'n Proto message (the schema's,
the reference's), laid out and parsed by hand. It is a storage record (sealed by
`tlog.record.aggregation`), not a wire message; its blocks are TlogBlocks, laid out as the
wire's (`tlog.protocol.wire`).

Layout (word = 8 bytes, offsets in words): data section of 2 words (size, timestamp), 4
pointers (name, vdiskID, blocks, prev); 3 data words when our epoch (word 2) is set. The
blocks are a composite list of TlogBlocks, each 4 data words and 2 pointers. Only
single-segment messages with near pointers are parsed here; a None sends the caller to
pycapnp.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from tlog.protocol.pointers import (
    BYTE_LIST,
    U32X2,
    U64,
    WORD,
    ZEROS,
    byte_list,
    list_ptr,
    pad,
    signed30,
    struct_root,
)
from tlog.protocol.wire import (
    BLOCK_DATA,
    BLOCK_DATA_WORDS,
    BLOCK_PTRS,
    Block,
    BlockFields,
    Buffer,
)

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
    elem_words = BLOCK_DATA_WORDS + BLOCK_PTRS
    tail_at = elems_at + n * elem_words
    ptr0 = agg_start + data_words  # word of the name pointer
    head = struct.pack(
        "<QQQ" + "Q" * (data_words - _AGG_DATA_WORDS) + "QQQQ",
        (data_words << 32) | (_AGG_PTRS << 48),
        n, timestamp,
        *((epoch,) if epoch else ()),
        list_ptr(ptr0, name_at, 2, len(name_b) + 1),
        list_ptr(ptr0 + 1, vdisk_at, 2, len(vdisk_b) + 1),
        list_ptr(ptr0 + 2, tag_at, 7, n * elem_words),
        list_ptr(ptr0 + 3, prev_at, 2, len(prev)),
    )
    parts: list[Buffer] = [
        head,
        name_b, ZEROS[:_text_words(name_b) * 8 - len(name_b)],
        prev, ZEROS[:pad(len(prev))],
        vdisk_b, ZEROS[:_text_words(vdisk_b) * 8 - len(vdisk_b)],
        # composite list tag: a struct "pointer" whose offset is the element count
        U64.pack((n << 2) | (BLOCK_DATA_WORDS << 32) | (BLOCK_PTRS << 48)),
    ]
    elems: list[bytes] = []
    tail: list[Buffer] = []
    at = tail_at
    pack_elem = struct.Struct("<QqQQQQ").pack
    append, extend = elems.append, tail.extend
    hash_ptr_word = elems_at + BLOCK_DATA_WORDS - elem_words
    for b in blocks:
        hash_ptr_word += elem_words
        h, d = b.hash, b.data
        hash_len, data_len = len(h), len(d)
        if hash_len == 32 and data_len and not data_len & 7:
            # the usual block, laid out as _list_ptr would (both targets lie ahead)
            data_at = at + 4
            append(pack_elem(
                b.sequence, b.index, b.timestamp, b.operation,
                BYTE_LIST | ((at - hash_ptr_word - 1) << 2) | (32 << 35),
                BYTE_LIST | ((data_at - hash_ptr_word - 2) << 2) | (data_len << 35)))
            extend((h, d))
            at = data_at + (data_len >> 3)
            continue
        data_at = at + (hash_len + 7) // 8
        append(pack_elem(
            b.sequence, b.index, b.timestamp, b.operation,
            list_ptr(hash_ptr_word, at, 2, hash_len) if hash_len else 0,
            list_ptr(hash_ptr_word + 1, data_at, 2, data_len) if data_len else 0,
        ))
        extend((h, ZEROS[:pad(hash_len)], d, ZEROS[:pad(data_len)]))
        at = data_at + (data_len + 7) // 8
    parts.extend(elems)
    parts.extend(tail)
    return [U32X2.pack(0, at), *parts]


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
    loc = byte_list(seg, seg_words, ptr_word)
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
    values = _elements(count).unpack_from(seg, first * WORD)
    limit = seg_words * WORD
    blocks: list[Block] = []
    append = blocks.append
    ptr_word = first + BLOCK_DATA_WORDS  # word of the first element's hash pointer
    for i in range(0, 6 * count, 6):
        hp = values[i + 4]
        dp = values[i + 5]
        if hp:
            if hp & _BYTES_PTR_MASK != _BYTES_PTR:
                return None
            off = (hp >> 2) & 0x3FFFFFFF
            start = (ptr_word + 1 + (off - (1 << 30) if off & (1 << 29) else off)) * WORD
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
            start = (ptr_word + 2 + (off - (1 << 30) if off & (1 << 29) else off)) * WORD
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
    seg_words = len(seg) // WORD
    root = struct_root(seg, seg_words)
    if root is None:
        return None
    start, data_words, ptrs = root
    if data_words < _AGG_DATA_WORDS or ptrs < _AGG_PTRS:
        return None
    size, timestamp = struct.unpack_from("<QQ", seg, start * WORD)
    epoch = U64.unpack_from(seg, (start + 2) * WORD)[0] if data_words > 2 else 0
    p0 = start + data_words
    name = _text(seg, seg_words, p0)
    vdisk = _text(seg, seg_words, p0 + 1)
    prev_loc = byte_list(seg, seg_words, p0 + 3)
    if name is None or vdisk is None or prev_loc is None:
        return None
    prev = bytes(seg[prev_loc[0]:prev_loc[0] + prev_loc[1]])
    word = U64.unpack_from(seg, (p0 + 2) * WORD)[0]
    blocks: list[Block] = []
    if word != 0:
        if word & 3 != 1 or (word >> 32) & 7 != 7:
            return None
        tag_at = p0 + 2 + 1 + signed30(word >> 2)
        total_words = word >> 35
        if tag_at < 0 or tag_at + 1 + total_words > seg_words:
            return None
        tag = U64.unpack_from(seg, tag_at * WORD)[0]
        if tag & 3 != 0:
            return None
        count = (tag >> 2) & 0x3FFFFFFF
        dw = (tag >> 32) & 0xFFFF
        pc = tag >> 48
        elem = dw + pc
        if count * elem > total_words or dw < 1:
            return None
        if dw == BLOCK_DATA_WORDS and pc == BLOCK_PTRS:
            canonical = _canonical_blocks(seg, seg_words, tag_at + 1, count)
            if canonical is None:
                return None
            return RawAggregation(name or "", size, timestamp, vdisk or "", prev, canonical,
                                  epoch)
        for i in range(count):
            at = tag_at + 1 + i * elem
            raw = bytes(seg[at * WORD:(at + dw) * WORD]).ljust(BLOCK_DATA.size, b"\0")
            sequence, index, ts, op = BLOCK_DATA.unpack_from(raw)
            views = []
            for j in range(BLOCK_PTRS):
                if j >= pc:
                    views.append(seg[0:0])
                    continue
                loc = byte_list(seg, seg_words, at + dw + j)
                if loc is None:
                    return None
                views.append(seg[loc[0]:loc[0] + loc[1]])
            blocks.append(Block(sequence, index, ts, op, views[0], views[1]))
    return RawAggregation(name or "", size, timestamp, vdisk or "", prev, blocks, epoch)
