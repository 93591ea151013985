"""Cap'n Proto's unpacked encoding word by word, as the hand-laid layouts read and build it
(`tlog.protocol.wire` for the messages, `tlog.record.layout` for the stored aggregation):
words of 8 bytes, struct pointers, list pointers to bytes.

Only near pointers are read here (no far pointers, no capabilities): a message that uses
anything else is left to pycapnp by the callers (a None from the readers)."""

from __future__ import annotations

import struct

#: Bytes per word.
WORD = 8
U64 = struct.Struct("<Q")
#: The stream framing of one segment: segment count - 1, then the segment's words.
U32X2 = struct.Struct("<II")
#: Padding to the next word: ``ZEROS[:pad(n)]``.
ZEROS = bytes(8)
#: A list pointer's tag and element size (bytes), without its offset and count.
BYTE_LIST = 1 | (2 << 32)


def pad(n: int) -> int:
    """Bytes of padding after ``n`` bytes, to the next word."""
    return (-n) & 7


def signed30(value: int) -> int:
    """A pointer's 30-bit signed offset, in words."""
    value &= 0x3FFFFFFF
    return value - (1 << 30) if value & (1 << 29) else value


def list_ptr(ptr_word: int, target_word: int, elem_size: int, count: int) -> int:
    """A list pointer at word ``ptr_word`` to ``count`` elements of size code ``elem_size``
    (2: bytes, 5: 8-byte words, 7: composite) at ``target_word``."""
    offset = (target_word - ptr_word - 1) & 0x3FFFFFFF
    return 1 | (offset << 2) | (elem_size << 32) | (count << 35)


def struct_root(seg: memoryview | bytes, seg_words: int) -> tuple[int, int, int] | None:
    """(start word, data words, pointer count) of the root struct, or None if not a near one."""
    if seg_words < 1:
        return None
    word = U64.unpack_from(seg, 0)[0]
    if word == 0:
        return (1, 0, 0)  # null root: every field reads as its default
    if word & 3 != 0:
        return None
    offset = signed30(word >> 2)
    start = 1 + offset
    data_words = (word >> 32) & 0xFFFF
    ptrs = word >> 48
    if start < 1 or start + data_words + ptrs > seg_words:
        return None
    return (start, data_words, ptrs)


def byte_list(seg: memoryview | bytes, seg_words: int, ptr_word: int) -> tuple[int, int] | None:
    """(byte offset, length) of the Data list at pointer ``ptr_word``; None if not plain."""
    word = U64.unpack_from(seg, ptr_word * WORD)[0]
    if word == 0:
        return (0, 0)
    if word & 3 != 1 or (word >> 32) & 7 != 2:
        return None
    start = ptr_word + 1 + signed30(word >> 2)
    length = word >> 35
    if start < 0 or start * WORD + length > seg_words * WORD:
        return None
    return (start * WORD, length)
