"""Every key name tlog gives the storage, and the small values it encodes beside them: the one
place to look up what lives where.

On every server of a vdisk's pool (``<vdisk>`` is the vdisk id in UTF-8):

- ``<hash>``: piece ``i`` of an aggregation on server ``i`` (the 32-byte record hash).
- ``last_hash_<vdisk>``: the newest aggregation hashes, head first (`LAST_HASH_KEEP`).
- ``tlog_missing_<vdisk>:<hex hash>``: an aggregation missing pieces, the value the servers
  that missed them (``2,5``).
- ``tlog_checkpoints_<vdisk>``: the checkpoints (each one's last part's hash).
- ``tlog_pins_<vdisk>``: the named restore points (JSON values).
- ``tlog_compact_<vdisk>``, ``tlog_compact_parts_<vdisk>``: an unfinished compaction's
  journal and the parts it may have stored; ``tlog_compact_lock_<vdisk>``: its lease.

Under the prefix of a Redis block store (a standby, a restore, a served device), beside the
blocks' ``<prefix><index>`` keys (`tlog.storage.blockstore`), keys that never end in a
decimal index:

- ``<prefix>tlog:slave-sync``: the standby's position (slave sync).
- ``<prefix>tlog:nbd``, ``<prefix>tlog:nbd-regions``: the state and intent log of a
  ``tlog nbd`` export.
"""

from __future__ import annotations

from collections.abc import Sequence

#: How many hashes each server keeps in ``last_hash_<vdiskID>`` (the reference trims to 0..5).
LAST_HASH_KEEP = 6
#: The start of every missing-piece marker's key.
MARKER_PREFIX = b"tlog_missing_"
#: The standby position's key, after the block store's prefix.
STANDBY_POSITION_SUFFIX = b"tlog:slave-sync"

_GLOB_SPECIAL = b"*?[]\\"


def last_hash_key(vdisk_id: str) -> bytes:
    """The key of the list of a vdisk's newest aggregation hashes (one per server)."""
    return b"last_hash_" + vdisk_id.encode()


def checkpoint_list_key(vdisk_id: str) -> bytes:
    """The key of the list of a vdisk's checkpoints (the hash of each one's last part)."""
    return b"tlog_checkpoints_" + vdisk_id.encode()


def pin_list_key(vdisk_id: str) -> bytes:
    """The key of the list of a vdisk's named restore points (JSON values)."""
    return b"tlog_pins_" + vdisk_id.encode()


def compaction_key(vdisk_id: str) -> bytes:
    """The key of a compaction's journal (JSON), present while one is unfinished."""
    return b"tlog_compact_" + vdisk_id.encode()


def compaction_parts_key(vdisk_id: str) -> bytes:
    """The list of the checkpoint parts an unfinished compaction may have stored."""
    return b"tlog_compact_parts_" + vdisk_id.encode()


def compaction_lock_key(vdisk_id: str) -> bytes:
    """The lease held by the one compaction of a vdisk that may run."""
    return b"tlog_compact_lock_" + vdisk_id.encode()


def marker_key(vdisk_id: str, key: bytes) -> bytes:
    """The marker that says aggregation ``key`` of ``vdisk_id`` misses pieces."""
    return _marker_start(vdisk_id) + key.hex().encode()


def marker_value(indexes: Sequence[int]) -> bytes:
    """The servers that missed the aggregation: ``b"2,5"``."""
    return ",".join(str(i) for i in indexes).encode()


def parse_marker_value(value: bytes) -> list[int]:
    """The server indexes of a marker value; unreadable parts are skipped."""
    return [int(part) for part in value.split(b",") if part.strip().isdigit()]


def marker_pattern(vdisk_id: str) -> bytes:
    """The SCAN MATCH pattern of every marker of ``vdisk_id``."""
    return glob_escape(_marker_start(vdisk_id)) + b"*"


def marker_hash(vdisk_id: str, name: bytes) -> bytes | None:
    """The aggregation hash a marker key of ``vdisk_id`` names; None when ``name`` is no
    such marker (another vdisk's, or garbled)."""
    start = _marker_start(vdisk_id)
    if not name.startswith(start):
        return None
    try:
        key = bytes.fromhex(name[len(start):].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    return key if len(key) == 32 else None


def _marker_start(vdisk_id: str) -> bytes:
    return MARKER_PREFIX + vdisk_id.encode() + b":"


def standby_position_key(prefix: bytes) -> bytes:
    """The position of a standby (slave sync), beside its blocks."""
    return prefix + STANDBY_POSITION_SUFFIX


def nbd_state_key(prefix: bytes) -> bytes:
    """The state of a served block store (`tlog.nbd.intent`), beside its blocks."""
    return prefix + b"tlog:nbd"


def nbd_regions_key(prefix: bytes) -> bytes:
    """The regions marked in a served block store's intent log (`tlog.nbd.intent`)."""
    return prefix + b"tlog:nbd-regions"


def glob_escape(text: bytes) -> bytes:
    """``text`` with the characters a Redis glob pattern (SCAN MATCH) gives a meaning to
    escaped: it matches itself alone."""
    return b"".join(b"\\" + bytes((c,)) if c in _GLOB_SPECIAL else bytes((c,)) for c in text)
