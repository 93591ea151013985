"""Range operations (ours): one TlogBlock that deletes the blocks ``[index, index + count)``
(`Operation.DELETE_RANGE`), the count as its data: 8 bytes, little endian. Its hash is the
BLAKE2b of those bytes like any block's, so every check of a block holds for it unchanged,
and a reader that does not know the operation refuses it rather than misread it."""

from __future__ import annotations

import struct

from .status import Operation
from .wire import Buffer

_COUNT = struct.Struct("<Q")
#: Block indexes are Int64 on the wire: a range ends at most here.
INDEX_LIMIT = 1 << 63
DELETE_RANGE = int(Operation.DELETE_RANGE)


class RangeError(ValueError):
    """A range that cannot be: an empty one, one past the last index, or bad data."""


def range_data(first: int, count: int) -> bytes:
    """The data of a range block deleting ``count`` blocks from ``first``; RangeError for
    a range that cannot be."""
    check_range(first, count)
    return _COUNT.pack(count)


def check_range(first: int, count: int) -> None:
    if first < 0:
        raise RangeError(f"range from block {first}: a block index is >= 0")
    if count < 1:
        raise RangeError(f"range of {count} blocks from block {first}: at least one")
    if first + count > INDEX_LIMIT:
        raise RangeError(f"range of {count} blocks from block {first}: past the last index")


def range_count(index: int, data: Buffer) -> int:
    """The count of a range block at ``index`` with ``data``; RangeError when it is not
    one that can be."""
    if len(data) != _COUNT.size:
        raise RangeError(f"range at block {index}: {len(data)} bytes of data, not 8")
    count: int = _COUNT.unpack(data)[0]
    check_range(index, count)
    return count
