"""Aggregations: the blocks of one flush, as a sealed record in the storage pool.

Record formats, all erasure-coded the same way afterwards (`tlog.record.erasure`) and
stored under the record's hash (`tlog.record.keying`):

- **v3** (ours, the default; docs/storage-format.md): a plaintext header that
  says what the record is (format, key id, sequence range, prev, vdisk), then
  the snappy-compressed Cap'n Proto aggregation sealed with AES-256-GCM under a
  per-vdisk key and a fresh random nonce, the header as associated data. Keyed by
  BLAKE3-256.
- **v2**: the same layout ("the v2 layout", `V2Header`) with version byte 2, keyed by
  BLAKE2b-256: what tlog wrote before v3, still read, and written on request (a fleet
  that may roll back to a tlog without v3).
- **legacy** (0-Disk's): snappy + AES-256-GCM with one static nonce and no
  associated data, keyed by BLAKE2b-256. Kept to read the reference's storage and to
  write storage its tools can read.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import cramjam

from tlog.protocol import schema, wire
from tlog.protocol.wire import Block, BlockFields

from . import crypto, layout
from .keying import (
    HASH_SIZE,
    V2_MAGIC,
    V2_VERSION,
    V3_VERSION,
    VERSIONS,
    blake2b_key,
    record_key,
    record_key_matches,
    record_version,
)
from .steps import Steps, Work, run_now

log = logging.getLogger(__name__)

ZERO_HASH = bytes(HASH_SIZE)
LEGACY_NAME = "The Go Tlog"
V2_NAME = "tlog"
#: The format name of each version of our layout (`Aggregation.format`, `tlog inspect`).
FORMAT_NAMES = {V2_VERSION: "v2", V3_VERSION: "v3"}
#: `RecordOpener` formats that read our records only.
OUR_FORMATS = ("v3", "v2")

COMPRESSION_SNAPPY = 1
# magic, version, compression, flags, key id, first seq, last seq, count, timestamp, prev,
# length of the vdisk id (which follows, then the extensions the flags announce)
_V2_HEAD = struct.Struct("<4sBBHIQQIQ32sH")
#: Flag: a uint64 epoch follows the vdisk id (records of epoch 0 do without).
FLAG_EPOCH = 1
#: Flag: the record is a part of a checkpoint (`CheckpointMark` follows, after the epoch).
FLAG_CHECKPOINT = 2
_KNOWN_FLAGS = FLAG_EPOCH | FLAG_CHECKPOINT
_U64 = struct.Struct("<Q")
# part index, number of parts, the covered hash, number of applied ranges (which follow)
_MARK = struct.Struct("<II32sI")
_RANGE = struct.Struct("<QQ")
NONCE_SIZE = 12
#: Bytes of plaintext copied per step of `V2Writer.seal_in_steps` (a tenth of a
#: millisecond), and the size under which it seals in a single step.
SEAL_STEP = 256 * 1024


class RecordError(Exception):
    """A stored record that cannot be opened: wrong key, tampered, truncated, not ours."""


class MissingKeyError(RecordError):
    """The record was sealed under a master key we were not given.

    The message names the key id (as `crypto.key_id` prints it, 8 hex digits) so that an
    operator can find the key file to add after a key rotation.
    """

    def __init__(self, key_id: int, known: Sequence[int] = ()) -> None:
        have = ", ".join(f"{k:08x}" for k in known) or "none"
        super().__init__(f"record sealed with master key id {key_id:08x}, which was not "
                         f"given (keys given: {have}); add that key's file "
                         "(--old-key-file or another --key-file)")
        self.key_id = key_id


@dataclass(frozen=True)
class CheckpointMark:
    """What makes a v2 record a part of a checkpoint (docs/storage-format.md).

    A checkpoint stands for the state of a vdisk once every aggregation up to and
    including ``covered`` is applied: its live blocks, cut into ``parts`` records chained
    by ``prev`` (part 0's ``prev`` is ``covered``). ``applied`` are the sequence ranges of
    the checkpoint's epoch replayed by then, so that a re-flushed copy stored after the cut
    is still recognised as one.
    """

    part: int
    parts: int
    covered: bytes
    applied: tuple[tuple[int, int], ...] = ()

    def pack(self) -> bytes:
        return (_MARK.pack(self.part, self.parts, self.covered, len(self.applied))
                + b"".join(_RANGE.pack(start, end) for start, end in self.applied))

    @classmethod
    def unpack_from(cls, record: bytes | memoryview, at: int) -> tuple[CheckpointMark, int]:
        """The mark at ``at`` and the offset after it; RecordError when truncated."""
        if len(record) < at + _MARK.size:
            raise RecordError("v2 checkpoint record is truncated")
        part, parts, covered, count = _MARK.unpack_from(record, at)
        at += _MARK.size
        if len(record) < at + count * _RANGE.size or not part < parts:
            raise RecordError("v2 checkpoint record has a malformed mark")
        ranges = tuple(_RANGE.unpack_from(record, at + i * _RANGE.size) for i in range(count))
        return cls(part, parts, bytes(covered), ranges), at + count * _RANGE.size


@dataclass(frozen=True)
class SealedRecord:
    """One aggregation ready to store."""

    hash: bytes
    record: bytes
    first_sequence: int
    last_sequence: int
    sequences: tuple[int, ...]


@dataclass
class Aggregation:
    """One decoded aggregation."""

    hash: bytes
    prev: bytes
    vdisk_id: str
    timestamp: int
    name: str
    blocks: list[Block]
    record_size: int = 0
    compressed_size: int = 0
    key_id: int | None = None
    format: str = "v3"  # "v3", "v2" or "legacy"
    #: The vdisk's epoch this aggregation belongs to (docs/durability.md); 0 in the
    #: reference's storage, which has no epochs.
    epoch: int = 0
    #: Set when the record is a part of a checkpoint (then the sequence range is the
    #: checkpoint's, not its blocks'): from the authenticated v2 header.
    checkpoint: CheckpointMark | None = None
    #: The decompressed, framed aggregation the blocks are views into (None when built
    #: another way); a reader in another process sends this instead of the blocks.
    plain: bytes | memoryview | None = field(default=None, repr=False, compare=False)

    @property
    def first_sequence(self) -> int:
        return min(b.sequence for b in self.blocks) if self.blocks else 0

    @property
    def last_sequence(self) -> int:
        return max(b.sequence for b in self.blocks) if self.blocks else 0

    @property
    def data_size(self) -> int:
        return sum(len(b.data) for b in self.blocks)


def _plain_aggregation(name: str, timestamp: int, vdisk_id: str, prev: bytes,
                       blocks: Sequence[BlockFields], epoch: int = 0) -> bytes:
    return layout.encode_aggregation(name, timestamp, vdisk_id, prev, blocks, epoch)


def _parse_plain(plain: bytes | memoryview) -> layout.RawAggregation:
    """Decode a framed aggregation, by hand when possible, else through pycapnp."""
    header = wire.parse_frame_header(plain, 0, len(plain), len(plain))
    if header is None or header.header_len + header.body_len > len(plain):
        raise RecordError("aggregation frame is truncated")
    body = memoryview(plain)[header.header_len:header.header_len + header.body_len]
    if len(header.segment_sizes) == 1:
        parsed = layout.parse_aggregation(body)
        if parsed is not None:
            return parsed
    try:
        segs, at = [], 0
        for size in header.segment_sizes:
            segs.append(bytes(body[at:at + size]))
            at += size
        msg = schema.TlogAggregation.from_segments(segs)
        blocks = [Block(b.sequence, b.index, b.timestamp, b.operation,
                           memoryview(b.hash), memoryview(b.data)) for b in msg.blocks]
        return layout.RawAggregation(msg.name, msg.size, msg.timestamp, msg.vdiskID,
                                   bytes(msg.prev), blocks, msg.epoch)
    except Exception as exc:
        raise RecordError(f"malformed aggregation: {exc}") from None


def _decompress(data: bytes | memoryview) -> memoryview:
    """The snappy-decompressed ``data``, as a view of cramjam's buffer (no copy: the blocks
    parsed from it are views that keep it alive)."""
    try:
        return memoryview(cramjam.snappy.decompress_raw(data))
    except Exception as exc:
        raise RecordError(f"snappy decompression failed: {exc}") from None


def aggregation_from_plain(plain: bytes | memoryview, digest: bytes, record_size: int,
                           compressed_size: int, key_id: int | None,
                           fmt: str) -> Aggregation:
    """The aggregation in a decompressed plaintext (its blocks are views into it)."""
    raw = _parse_plain(plain)
    return Aggregation(digest, raw.prev, raw.vdisk_id, raw.timestamp, raw.name, raw.blocks,
                       record_size=record_size, compressed_size=compressed_size,
                       key_id=key_id, format=fmt, epoch=raw.epoch, plain=plain)


# -- v2 ------------------------------------------------------------------------


class V2Writer:
    """Seals a vdisk's aggregations in the v2 layout: as v3 records (BLAKE3 keys) unless
    ``version`` is `V2_VERSION` (BLAKE2b keys, readable by a tlog that predates v3)."""

    def __init__(self, master_key: bytes, vdisk_id: str, version: int = V3_VERSION) -> None:
        if version not in VERSIONS:
            raise ValueError(f"record version {version}: this tlog writes "
                             f"{' or '.join(map(str, VERSIONS))}")
        self.vdisk_id = vdisk_id
        self.version = version
        self.format = FORMAT_NAMES[version]
        self._vdisk = vdisk_id.encode()
        self._cipher = crypto.VdiskCipher(master_key, vdisk_id)

    def seal(self, prev: bytes, blocks: Sequence[BlockFields],
             timestamp: int | None = None, epoch: int = 0) -> SealedRecord:
        sequences = [b.sequence for b in blocks]
        return run_now(self._steps(prev, blocks, timestamp, epoch, min(sequences),
                                   max(sequences)))

    def seal_checkpoint(self, prev: bytes, mark: CheckpointMark,
                        blocks: Sequence[BlockFields], sequence: int, timestamp: int,
                        epoch: int = 0) -> SealedRecord:
        """One part of a checkpoint at ``sequence`` (its header's first and last sequence).
        ``prev``: the part before it, or ``mark.covered`` for part 0; ``blocks`` may be
        empty (a vdisk with no live block)."""
        return run_now(self.seal_checkpoint_in_steps(prev, mark, blocks, sequence, timestamp,
                                                     epoch))

    def seal_in_steps(self, prev: bytes, blocks: Sequence[BlockFields],
                      timestamp: int | None = None, epoch: int = 0) -> Steps[SealedRecord]:
        """`seal` as a stepped job (`tlog.record.steps`) for an event loop that must not
        stall while a large aggregation is sealed: the plaintext is copied together
        `SEAL_STEP` bytes at a time, then joined, compressed, encrypted, joined to its
        header and hashed by one `Work` each. One under `SEAL_STEP` of plaintext is sealed
        in a single step."""
        sequences = [b.sequence for b in blocks]
        return self._steps(prev, blocks, timestamp, epoch, min(sequences), max(sequences),
                           step=SEAL_STEP)

    def seal_checkpoint_in_steps(self, prev: bytes, mark: CheckpointMark,
                                 blocks: Sequence[BlockFields], sequence: int,
                                 timestamp: int, epoch: int = 0) -> Steps[SealedRecord]:
        """`seal_checkpoint` as a stepped job, as `seal_in_steps`."""
        return self._steps(prev, blocks, timestamp, epoch, sequence, sequence, mark,
                           step=SEAL_STEP)

    def _steps(self, prev: bytes, blocks: Sequence[BlockFields], timestamp: int | None,
               epoch: int, first: int, last: int, mark: CheckpointMark | None = None,
               step: int | None = None) -> Steps[SealedRecord]:
        """The sealing, in steps of ``step`` bytes of plaintext (None: in one go)."""
        ts = time.time_ns() if timestamp is None else timestamp
        sequences = tuple(b.sequence for b in blocks)
        parts = layout.aggregation_parts(V2_NAME, ts, self.vdisk_id, prev, blocks, epoch)
        flags = (FLAG_EPOCH if epoch else 0) | (FLAG_CHECKPOINT if mark is not None else 0)
        head = _V2_HEAD.pack(V2_MAGIC, self.version, COMPRESSION_SNAPPY, flags,
                             self._cipher.key_id, first, last, len(blocks), ts, prev,
                             len(self._vdisk)) + self._vdisk
        if epoch:
            head += _U64.pack(epoch)
        if mark is not None:
            head += mark.pack()
        if step is None or sum(map(len, parts)) <= step:
            compressed = cramjam.snappy.compress_raw(b"".join(parts))
            nonce, sealed = self._cipher.seal(bytes(compressed), head)
            record = b"".join((head, nonce, sealed))
            return SealedRecord(record_key(record), record, first, last, sequences)
        plain = yield from _joined(parts, step)
        compressed = yield Work(cramjam.snappy.compress_raw, (plain,), len(plain))
        del plain
        nonce, sealed = yield Work(self._cipher.seal, (memoryview(compressed), head),
                                   len(compressed))
        del compressed
        record = yield Work(b"".join, ((head, nonce, sealed),), len(sealed))
        del sealed
        digest = yield Work(record_key, (record,), len(record))
        return SealedRecord(digest, record, first, last, sequences)


def _joined(parts: Sequence[wire.Buffer], step: int) -> Steps[bytes]:
    """``parts`` joined: a step at a time into chunks of about ``step`` bytes, then the
    chunks by one `Work` (a join of bytes objects lets other threads run; a copy of a
    16 MB aggregation at once would take milliseconds, a fresh 16 MB buffer more)."""
    chunks: list[bytes] = []
    group: list[wire.Buffer] = []
    size = 0
    for part in parts:
        group.append(part)
        size += len(part)
        if size >= step:
            chunks.append(b"".join(group))
            group, size = [], 0
            yield None
    chunks.append(b"".join(group))
    joined: bytes = yield Work(b"".join, (chunks,), sum(map(len, chunks)))
    return joined


@dataclass(frozen=True)
class V2Header:
    """The plaintext, authenticated header of a record of the v2 layout (v2 or v3)."""

    key_id: int
    first_sequence: int
    last_sequence: int
    count: int
    timestamp: int
    prev: bytes
    vdisk_id: str
    compression: int
    size: int  # bytes of header, associated data
    epoch: int = 0
    checkpoint: CheckpointMark | None = None
    version: int = V3_VERSION


def is_v2_layout(record: bytes | memoryview) -> bool:
    """Whether ``record`` starts like one of ours (v2 or v3): the header `parse_v2_header`
    reads."""
    return record_version(record) is not None


def parse_v2_header(record: bytes | memoryview) -> V2Header:
    """Read the header of a v2 or v3 record without decrypting (it is authenticated once
    the record is opened)."""
    if len(record) < _V2_HEAD.size + NONCE_SIZE + 16 or not is_v2_layout(record):
        raise RecordError("not a tlog record (v2 or v3)")
    (_, version, compression, flags, key_id, first, last, count, ts, prev,
     vlen) = _V2_HEAD.unpack_from(record, 0)
    if flags & ~_KNOWN_FLAGS:
        raise RecordError(f"v2 record with unknown header flags {flags:#x} (written by a "
                          "newer tlog?)")
    end = _V2_HEAD.size + vlen
    epoch = 0
    if flags & FLAG_EPOCH:
        if len(record) < end + 8:
            raise RecordError("v2 record is truncated")
        (epoch,) = _U64.unpack_from(record, end)
        vdisk_end, end = end, end + 8
    else:
        vdisk_end = end
    mark = None
    if flags & FLAG_CHECKPOINT:
        mark, end = CheckpointMark.unpack_from(record, end)
    if len(record) < end + NONCE_SIZE + 16:
        raise RecordError("v2 record is truncated")
    vdisk = bytes(record[_V2_HEAD.size:vdisk_end]).decode("utf-8", "replace")
    return V2Header(key_id, first, last, count, ts, prev, vdisk, compression, end, epoch,
                    mark, version)


@dataclass
class Keyring:
    """Master keys by id, to open records sealed under any of them."""

    keys: dict[int, bytes] = field(default_factory=dict)
    _ciphers: dict[tuple[int, str], crypto.VdiskCipher] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, *keys: bytes) -> Keyring:
        """A keyring of these master keys (duplicates collapse: same key, same id)."""
        return cls({crypto.key_id(k): k for k in keys})

    @property
    def ids(self) -> list[int]:
        """The key ids held, in the order the keys were given."""
        return list(self.keys)

    def cipher(self, key_id: int, vdisk_id: str) -> crypto.VdiskCipher:
        """The cipher of ``vdisk_id`` under master key ``key_id`` (cached per pair);
        `MissingKeyError` names the id when the key was not given."""
        found = self._ciphers.get((key_id, vdisk_id))
        if found is None:
            master = self.keys.get(key_id)
            if master is None:
                raise MissingKeyError(key_id, list(self.keys))
            found = self._ciphers[(key_id, vdisk_id)] = crypto.VdiskCipher(master, vdisk_id)
        return found


def _digest(record: bytes, expected_hash: bytes | None, hash_checked: bool,
            key: Callable[[bytes], bytes]) -> bytes:
    """The record's key by the hash ``key`` of its format; not computed again when the
    caller already checked it against ``expected_hash`` (a reader that rebuilt the record
    from pieces had to)."""
    if hash_checked and expected_hash is not None:
        return expected_hash
    digest = key(record)
    if expected_hash is not None and digest != expected_hash:
        raise RecordError("record hash does not match its key")
    return digest


def open_v2(record: bytes, keyring: Keyring, expected_hash: bytes | None = None,
            hash_checked: bool = False) -> Aggregation:
    """Check and decrypt a v2 or v3 record into its aggregation (its key: BLAKE3 for v3,
    BLAKE2b for v2, as its authenticated version byte says)."""
    head = parse_v2_header(record)
    digest = _digest(record, expected_hash, hash_checked, record_key)
    cipher = keyring.cipher(head.key_id, head.vdisk_id)
    view = memoryview(record)  # slices of a view, not copies of a 100 KB record
    nonce = bytes(view[head.size:head.size + NONCE_SIZE])
    try:
        compressed = cipher.open(nonce, view[head.size + NONCE_SIZE:], view[:head.size])
    except crypto.IntegrityError:
        raise RecordError("authentication failed: wrong key or tampered record") from None
    if head.compression != COMPRESSION_SNAPPY:
        raise RecordError(f"unknown compression {head.compression}")
    plain = _decompress(compressed)
    agg = aggregation_from_plain(plain, digest, len(record), len(compressed), head.key_id,
                                 FORMAT_NAMES[head.version])
    if agg.prev != head.prev or agg.vdisk_id != head.vdisk_id or agg.epoch != head.epoch:
        raise RecordError("record header does not match its sealed content")
    agg.checkpoint = head.checkpoint
    return agg


# -- legacy (0-Disk) ---------------------------------------------------------------


class LegacyWriter:
    """Seals aggregations exactly as the 0-Disk server does (static nonce, no AAD)."""

    format = "legacy"

    def __init__(self, priv_key: bytes, nonce: bytes, vdisk_id: str) -> None:
        self.vdisk_id = vdisk_id
        self._cipher = crypto.LegacyCipher(priv_key, nonce)

    def seal(self, prev: bytes, blocks: Sequence[BlockFields],
             timestamp: int | None = None, epoch: int = 0) -> SealedRecord:
        ts = time.time_ns() if timestamp is None else timestamp
        sequences = tuple(b.sequence for b in blocks)
        plain = _plain_aggregation(LEGACY_NAME, ts, self.vdisk_id, prev, blocks, epoch)
        record = self._cipher.seal(bytes(cramjam.snappy.compress_raw(plain)))
        # BLAKE2b whatever the record's first bytes: 0-Disk keys its records so
        return SealedRecord(blake2b_key(record), record, min(sequences), max(sequences),
                            sequences)

    def seal_in_steps(self, prev: bytes, blocks: Sequence[BlockFields],
                      timestamp: int | None = None, epoch: int = 0) -> Steps[SealedRecord]:
        """`seal` as one `Work` (the legacy format is kept for compatibility, not speed:
        a large one is sealed in a thread, its Python parts holding the GIL)."""
        size = sum(len(b.data) for b in blocks)
        record: SealedRecord = yield Work(self.seal, (prev, blocks, timestamp, epoch), size)
        return record


def open_legacy(record: bytes, cipher: crypto.LegacyCipher,
                expected_hash: bytes | None = None, hash_checked: bool = False) -> Aggregation:
    digest = _digest(record, expected_hash, hash_checked, blake2b_key)
    try:
        compressed = cipher.open(record)
    except crypto.IntegrityError:
        raise RecordError("authentication failed: wrong key/nonce or tampered record") from None
    return aggregation_from_plain(_decompress(compressed), digest, len(record),
                                  len(compressed), None, "legacy")


@dataclass
class RecordOpener:
    """Opens records of any format with the keys at hand ("auto" tells them apart).

    ``format``: "auto"; "v3" or "v2" (ours only: records of either version, a chain may
    hold both after an upgrade; the two differ in what a writer set up from the same
    options writes); "legacy" (0-Disk's only).
    """

    keyring: Keyring
    legacy: crypto.LegacyCipher | None = None
    format: str = "auto"  # "v3", "v2", "legacy" or "auto"

    @property
    def ours_only(self) -> bool:
        """Whether only our records (v2 layout) are read."""
        return self.format in OUR_FORMATS

    def key_matches(self, record: bytes | memoryview, key: bytes) -> bool:
        """Whether ``record`` is the one stored under ``key``, by its format's hash
        (`record_key_matches`). A reader of legacy storage alone keys every record by
        BLAKE2b, as 0-Disk does: a legacy record that happens to start like a v3 header (a
        chance of 2^-40) is still read, and no v3 record opens under the legacy cipher."""
        if self.format == "legacy":
            return blake2b_key(record) == key
        return record_key_matches(record, key)

    def open(self, record: bytes, expected_hash: bytes | None = None,
             hash_checked: bool = False) -> Aggregation:
        """Open a record; ``hash_checked``: the caller already knows it is stored under
        ``expected_hash`` (`key_matches`; skips hashing it again)."""
        # A legacy record is AES-GCM output, so it starts with our magic and a version
        # only by chance (2^-40); when it does, the v2/v3 open fails and legacy is tried.
        version = record_version(record) if self.format != "legacy" else None
        if version is not None:
            try:
                return open_v2(record, self.keyring, expected_hash, hash_checked)
            except MissingKeyError:
                raise  # a header naming a key we lack: say so, not "legacy failed"
            except RecordError:
                if self.ours_only or self.legacy is None:
                    raise
            if version == V3_VERSION:
                # The key was checked with BLAKE3; a legacy record's key is its BLAKE2b
                hash_checked = False
        if self.ours_only:
            raise RecordError("not a tlog record, v2 or v3 (a legacy one? try --format "
                              "legacy)")
        if self.legacy is None:
            raise RecordError("legacy record, but no legacy key and nonce were given")
        return open_legacy(record, self.legacy, expected_hash, hash_checked)


def check_blocks(agg: Aggregation) -> list[int]:
    """Sequences of the blocks whose BLAKE2b does not match their data."""
    bad = []
    blake2b = hashlib.blake2b
    for b in agg.blocks:
        # bytes == memoryview compares contents: no copy of the stored hash
        if blake2b(b.data, digest_size=HASH_SIZE).digest() != b.hash:
            bad.append(b.sequence)
    return bad


def describe(agg: Aggregation) -> Mapping[str, object]:
    """The summary `tlog inspect` prints for an aggregation."""
    return {
        "hash": agg.hash.hex(),
        "prev": agg.prev.hex(),
        "first_sequence": agg.first_sequence,
        "last_sequence": agg.last_sequence,
        "blocks": len(agg.blocks),
        "timestamp": agg.timestamp,
        "first_block_timestamp": min((b.timestamp for b in agg.blocks), default=0),
        "last_block_timestamp": max((b.timestamp for b in agg.blocks), default=0),
        "data_bytes": agg.data_size,
        "record_bytes": agg.record_size,
        "compressed_bytes": agg.compressed_size,
        "format": agg.format,
        "epoch": agg.epoch,
        # which master key sealed it (v2), to plan a key's retirement; None for legacy
        "key_id": f"{agg.key_id:08x}" if agg.key_id is not None else None,
        # a part of a checkpoint: "part/parts of the state after <covered hash>"
        "checkpoint": (None if agg.checkpoint is None else
                       f"{agg.checkpoint.part + 1}/{agg.checkpoint.parts} of the state after "
                       f"{agg.checkpoint.covered.hex()}"),
    }
