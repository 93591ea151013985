"""Reading a vdisk's log back: walk the chain, check every record, replay it.

- `tlog.read.head`: where the chain ends (the servers' last-hash lists).
- `tlog.read.fetch`: one record opened (its pieces read back by `tlog.record.pieces`).
- `tlog.read.chain`: `ChainReader`, the walk back and the checked replay forward
  (`tlog.read.links` holds what they pass around, `tlog.read.limiter` the bounds).
- `tlog.read.bulkread`: worker processes that open records in parallel for big reads.
- `tlog.read.player`: replaying into an image file or a Redis block store (`restore`).
- `tlog.read.checkpoints`: the checkpoints a compaction left, where a replay may start.
- `tlog.read.resends`: what stored sequences wrote (`tlog.record.identity`), to tell a
  client's resends from new writes.
- `tlog.read.verify`, `tlog.read.repair`, `tlog.read.rekey`: checking a chain, rewriting
  missing pieces, re-sealing a chain under a new key.
"""

from tlog.record.pieces import DecodeError, Fetched, fetch_record

from .chain import ChainReader, aggregations
from .fetch import read_aggregation
from .head import find_last
from .limiter import Limiter, SequenceSet
from .links import ChainItem, ChainLink
from .player import (
    DEFAULT_BLOCK_SIZE,
    BlockStorage,
    FileBlockStorage,
    Player,
    PlayerError,
    PlayResult,
    RedisBlockStorage,
    restore,
)
from .resends import stored_writes
from .verify import Problem, VerifyReport, verify_chain

__all__ = [
    "DEFAULT_BLOCK_SIZE", "BlockStorage", "ChainItem", "ChainLink", "ChainReader", "DecodeError",
    "Fetched", "FileBlockStorage", "Limiter", "PlayResult", "Player", "PlayerError", "Problem",
    "RedisBlockStorage", "SequenceSet", "VerifyReport", "aggregations",
    "fetch_record", "find_last", "read_aggregation", "restore", "stored_writes", "verify_chain",
]
