"""The key a stored record is kept under: the hash of the whole record, chosen by its format.

A record's key is its name in every storage server and the ``prev`` of the record after it,
so a reader checks every record it fetches against the key it fetched it by. Which hash
makes the key is fixed by the record's own first bytes (docs/storage-format.md):

- **v3** (``TLG2`` and version 3): BLAKE3-256 of the record;
- **v2** (``TLG2`` and version 2) and **legacy** (0-Disk's, which expects it): BLAKE2b-256.

One record has exactly one valid key: a record that claims v3 is checked with BLAKE3 alone,
never "either hash", so the same bytes cannot be accepted under a second name. Both digests
are 32 bytes: keys and ``prev`` links keep their size across formats, and a chain can go on
from v2 records to v3 ones (a server upgraded mid-chain). The wire's block hashes are
BLAKE2b-256 and stay so: they are not record keys.
"""

from __future__ import annotations

import hashlib

import blake3

HASH_SIZE = 32
#: The magic every record of ours starts with, then its version byte.
V2_MAGIC = b"TLG2"
V2_VERSION = 2
V3_VERSION = 3
#: Versions of our layout this tlog reads (and can write).
VERSIONS = (V2_VERSION, V3_VERSION)
_V2_PREFIX = V2_MAGIC + bytes((V2_VERSION,))
_V3_PREFIX = V2_MAGIC + bytes((V3_VERSION,))


def record_version(record: bytes | memoryview) -> int | None:
    """The version of one of our records (2 or 3) by its first five bytes; None for any
    other record (legacy, or a version this tlog does not know)."""
    start = bytes(record[:5])
    if start == _V3_PREFIX:
        return V3_VERSION
    if start == _V2_PREFIX:
        return V2_VERSION
    return None


def blake2b_key(record: bytes | memoryview) -> bytes:
    """BLAKE2b-256 of ``record``: the key of a v2 or legacy record."""
    return hashlib.blake2b(record, digest_size=HASH_SIZE).digest()


def blake3_key(record: bytes | memoryview) -> bytes:
    """BLAKE3-256 of ``record``: the key of a v3 record (blake3 releases the GIL while it
    hashes a large input, as hashlib does)."""
    return blake3.blake3(record).digest()


def record_key(record: bytes | memoryview) -> bytes:
    """The key ``record`` is stored under, and the ``prev`` of the record after it: BLAKE3
    for a v3 record, BLAKE2b for any other."""
    if bytes(record[:5]) == _V3_PREFIX:
        return blake3_key(record)
    return blake2b_key(record)


def record_key_matches(record: bytes | memoryview, key: bytes) -> bool:
    """Whether ``record`` is the one stored under ``key``, by the hash its format names."""
    return record_key(record) == key
