"""Reading one aggregation back: its record fetched from the pool and checked
(`tlog.record.pieces`), then opened (decrypted, decoded) with the vdisk's keys; and how far
the chain walk asks storage server 0 to read headers by itself.
"""

from __future__ import annotations

from tlog.record.aggregation import Aggregation, RecordError, RecordOpener
from tlog.record.erasure import ErasureCoder
from tlog.record.pieces import DecodeError, fetch_record
from tlog.record.steps import off_loop
from tlog.storage import StoragePool

#: Headers the chain walk has storage server 0 read in its first run
#: (`tlog.record.pieces.PieceReader.header_run`); each next run reads twice as many, up to
#: `MAX_HEADER_RUN` (a few milliseconds of the server's time), so a walk that a start limit
#: stops early reads little more than it needs.
FIRST_HEADER_RUN = 64
MAX_HEADER_RUN = 2048
#: Headers of a run parsed between two turns of the event loop (under a millisecond).
HEADER_STEP = 128
#: Script runs in a row that find no v2 or v3 header before the walk stops asking for them.
SCRIPT_MISSES = 3


def open_checked(opener: RecordOpener, record: bytes, key: bytes) -> Aggregation:
    """Open a record that `PieceReader.fetch` already checked against its key."""
    try:
        return opener.open(record, key, hash_checked=True)
    except RecordError as exc:
        raise DecodeError(f"aggregation {key.hex()}: {exc}", key) from None


async def open_fetched(opener: RecordOpener, record: bytes, key: bytes) -> Aggregation:
    """`open_checked`, in a thread when the record is large (decrypting and decompressing
    16 MB takes an event loop's milliseconds)."""
    return await off_loop(open_checked, opener, record, key, size=len(record))


async def read_aggregation(pool: StoragePool, key: bytes, opener: RecordOpener,
                           coder: ErasureCoder | None = None) -> Aggregation:
    """Fetch, check and open one aggregation."""
    fetched = await fetch_record(pool, key, coder, opener.key_matches)
    return await open_fetched(opener, fetched.record, key)
