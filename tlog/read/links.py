"""A chain's links (what the walk back finds: key, prev, sequence range, epoch) and the
items of its replay (what a reader yields per aggregation)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tlog.protocol.wire import Block
from tlog.record.aggregation import Aggregation, CheckpointMark

from .bulkread import SLOT_BYTES

#: Records fetched together (one MGET per data server)...
BATCH = 32
#: ...and about as many bytes of plaintext at most (see `cut_batches`), estimated from the
#: block counts at `BLOCK_ESTIMATE` bytes per block (4 KiB of data and its framing).
BATCH_BYTES = 3 * SLOT_BYTES // 4
BLOCK_ESTIMATE = 4096 + 128


@dataclass
class ChainLink:
    """One aggregation found by the walk back: what is known of it before the replay.

    A link walked through its v2 header alone (``verified`` False) holds only piece 0; its
    header is checked when the record is fetched whole and opened (hash = key, then the
    AES-GCM tag, which covers the header).
    """

    key: bytes
    prev: bytes
    first_sequence: int
    last_sequence: int
    count: int  # blocks
    timestamp: int  # of the aggregation (flush time)
    record: bytes | None = None  # fetched and hash-checked, not opened yet (v2)
    agg: Aggregation | None = None  # opened already (legacy, the head, time limits)
    piece0: bytes | None = None  # the first piece, when only the header was read
    verified: bool = True  # whether the fields above come from a hash-checked record
    missing: list[int] = field(default_factory=list)
    corrupt: list[int] = field(default_factory=list)
    epoch: int = 0
    #: Set for a part of a checkpoint (the walk's base), from its header.
    checkpoint: CheckpointMark | None = None
    #: Bytes of the record (its length as piece 0 states it), 0 when unknown.
    size: int = 0

    @property
    def cached_bytes(self) -> int:
        if self.agg is not None:
            return self.agg.record_size + self.agg.data_size
        if self.record is not None:
            return len(self.record)
        return len(self.piece0) if self.piece0 is not None else 0

    def drop(self) -> None:
        """Forget what was fetched (it is read again when needed)."""
        self.record = self.agg = self.piece0 = None


@dataclass
class ChainItem:
    """One aggregation of the replay, oldest first."""

    aggregation: Aggregation
    blocks: list[Block]  # to apply, in stored order: inside the limits, first occurrences
    duplicates: int  # blocks skipped because their sequence was replayed before
    missing: list[int]  # servers whose piece was missing (rebuilt from parity)
    corrupt: list[int]  # servers whose piece was corrupt (rebuilt from parity)
    #: The skipped blocks themselves (their sequence came earlier in the same epoch).
    repeats: list[Block] = field(default_factory=list)
    #: Whether this aggregation starts a new epoch (the first one of a chain does not).
    new_epoch: bool = False

    @property
    def checkpoint(self) -> CheckpointMark | None:
        """Set when this is a part of the checkpoint the replay starts from: its blocks are
        the vdisk's live blocks at the checkpoint, not writes in sequence order."""
        return self.aggregation.checkpoint


def cut_batches(links: list[ChainLink], size: int) -> list[list[ChainLink]]:
    """The links in batches of at most ``size`` records and about `BATCH_BYTES` of
    plaintext (by their block counts, or their records' sizes when larger: blocks of
    64 KiB): aggregations of 250 blocks of 4 KiB come 6 to a batch, so a batch still fits a
    worker's shared slot and the read-ahead stays a few batches; one of 250 blocks of
    64 KiB (16 MB) comes alone (the pieces of one batch come in one reply per server, which
    the event loop copies in one go)."""
    out: list[list[ChainLink]] = []
    batch: list[ChainLink] = []
    held = 0
    for link in links:
        estimate = max(max(1, link.count) * BLOCK_ESTIMATE, link.size)
        if batch and (len(batch) >= size or held + estimate > BATCH_BYTES):
            out.append(batch)
            batch, held = [], 0
        batch.append(link)
        held += estimate
    if batch:
        out.append(batch)
    return out
