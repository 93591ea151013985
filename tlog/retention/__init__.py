"""Retention: keeping a vdisk's log from growing without bound (docs/retention.md).

- `tlog.retention.policy`: what to keep (`RetentionPolicy`: since a time, a number of
  sequences, a number of bytes) and where that puts the cut.
- `tlog.retention.pins`: named restore points, never compacted away until unpinned.
- `tlog.retention.compact`: `Compactor`, which writes a checkpoint at the cut and then
  deletes what it covers, in an order that a crash at any point cannot hurt
  (`tlog.retention.build` builds the checkpoint, `tlog.retention.lock` keeps compactions
  of one vdisk apart).
- `tlog.retention.size`: how much of a log is stored (`measure_log`), for metrics.
"""

from .compact import (
    CompactionError,
    CompactionPlan,
    CompactionSummary,
    Compactor,
)
from .pins import Pin, PinError, add_pin, read_pins, remove_pin
from .policy import (
    RetentionPolicy,
    parse_duration,
    parse_size,
    parse_vdisk_retention,
    server_policy,
)
from .size import LogSize, compaction_marks, measure_log

__all__ = [
    "CompactionError", "CompactionPlan", "CompactionSummary", "Compactor", "LogSize", "Pin",
    "PinError", "RetentionPolicy", "add_pin", "compaction_marks", "measure_log",
    "parse_duration", "parse_size", "parse_vdisk_retention", "read_pins", "remove_pin",
    "server_policy",
]
