"""What makes a stored block the same write as a received one: tlogserver tells a client's
resend of stored blocks from a new write that reuses their sequences by it
(docs/durability.md), and `tlog verify` digests a chain's writes with it."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field


def write_identity(index: int, operation: int, timestamp: int,
                   digest: bytes | bytearray | memoryview) -> bytes:
    """What makes two blocks of one sequence the same write: a resend carries the very
    block the client first sent (its timestamp included); a new write under a reused
    sequence differs at least by its timestamp."""
    return struct.pack("<qBQ", index, operation & 0xFF, timestamp) + bytes(digest)


@dataclass
class StoredWrites:
    """`write_identity` by sequence of the stored blocks of one epoch from a sequence on."""

    identities: dict[int, bytes] = field(default_factory=dict)
    #: Sequences of the epoch below this were compacted into a checkpoint: what they wrote
    #: is no longer known one by one, so a block under one of them is not taken for a
    #: resend. 0 when nothing of the range read was compacted.
    compacted_below: int = 0
