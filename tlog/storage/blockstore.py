"""The layout of a Redis block store (`tlog restore --output-redis`, the standby slave sync
keeps, the `tlog nbd` redis backend): one key per block, ``<prefix><index>`` with the index
in decimal, holding the block's bytes; no key for a block never written or deleted. Other
keys under the prefix (the standby's position, an export's state: `tlog.storage.keys`) never
end in a decimal index. One place for the layout, and for deleting a range of blocks."""

from __future__ import annotations

from collections.abc import Iterable

from .keys import glob_escape

#: A range of up to this many blocks is deleted by naming its keys; a larger one by looking
#: at the keys the store holds under the prefix (SCAN): a trim of a whole device must cost
#: what the store holds, not what the device could.
RANGE_KEYS_MAX = 65536
#: Keys per DEL.
DELETE_BATCH = 1024


def default_prefix(vdisk_id: str) -> str:
    """The key prefix of a vdisk's block store when none is given (`tlog restore
    --output-redis`, `tlog nbd`, a standby): ``<vdisk>:``."""
    return f"{vdisk_id}:"


def block_key(prefix: bytes, index: int) -> bytes:
    """The key of block ``index``."""
    return b"%s%d" % (prefix, index)


def block_keys(prefix: bytes, first: int, count: int) -> list[bytes]:
    """The keys of blocks ``[first, first + count)``."""
    return [b"%s%d" % (prefix, i) for i in range(first, first + count)]


def batches(keys: list[bytes], size: int = DELETE_BATCH) -> Iterable[list[bytes]]:
    """``keys`` in lists of at most ``size`` (one DEL each)."""
    for at in range(0, len(keys), size):
        yield keys[at:at + size]


def scan_pattern(prefix: bytes) -> bytes:
    """The SCAN MATCH pattern of every key under ``prefix`` (its glob characters escaped)."""
    return glob_escape(prefix) + b"*"


def block_index(prefix: bytes, key: bytes) -> int | None:
    """The block index a key under ``prefix`` holds, None when it is no block's key."""
    suffix = key[len(prefix):]
    return int(suffix) if suffix.isdigit() else None


def in_range(prefix: bytes, key: bytes, first: int, count: int) -> bool:
    """Whether ``key`` (from a SCAN of the prefix) is a block's in ``[first, first+count)``."""
    index = block_index(prefix, key)
    return index is not None and first <= index < first + count


def keys_in_range(prefix: bytes, keys: Iterable[bytes], first: int,
                  count: int) -> list[bytes]:
    """Of ``keys`` (from a SCAN of the prefix), the blocks' keys in ``[first, first+count)``."""
    return [key for key in keys if in_range(prefix, key, first, count)]
