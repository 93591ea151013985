"""How an aggregation is stored: the record formats and what they are made of.

- `tlog.record.aggregation`: sealing and opening records, v3 and v2 (ours: an authenticated
  plaintext header, per-vdisk keys, random nonces) and legacy (0-Disk's layout).
- `tlog.record.keying`: the key a record is stored under (BLAKE3 for v3, else BLAKE2b).
- `tlog.record.crypto`: keys, key ids, AES-GCM for both formats.
- `tlog.record.erasure`: Reed-Solomon k+m pieces, byte-compatible with 0-Disk's.
- `tlog.record.pieces`: a record read back from the pool's pieces, rebuilt, hash-checked.
- `tlog.record.identity`: what makes a stored block the same write as a received one.
- `tlog.record.steps`: large records sealed and opened in steps, off the event loop.
"""

from .aggregation import (
    ZERO_HASH,
    Aggregation,
    Keyring,
    LegacyWriter,
    MissingKeyError,
    RecordError,
    RecordOpener,
    SealedRecord,
    V2Header,
    V2Writer,
    describe,
)
from .crypto import CryptoError, IntegrityError, load_key_file, parse_key
from .erasure import ErasureCoder, ErasureError
from .identity import StoredWrites, write_identity
from .keying import record_key, record_key_matches

__all__ = [
    "ZERO_HASH", "Aggregation", "CryptoError", "ErasureCoder", "ErasureError", "IntegrityError",
    "Keyring", "LegacyWriter", "MissingKeyError", "RecordError", "RecordOpener", "SealedRecord",
    "StoredWrites", "V2Header", "V2Writer", "describe", "load_key_file", "parse_key",
    "record_key", "record_key_matches", "write_identity",
]
