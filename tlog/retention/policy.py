"""What a vdisk keeps of its log (`RetentionPolicy`) and where that puts the cut."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tlog import units
from tlog.read.links import ChainLink
from tlog.units import parse_duration


def parse_size(text: str | int) -> int:
    """A retention size in bytes, more than 0 (`tlog.units.parse_size`: ``500MB``, ``10GiB``)."""
    size = units.parse_size(text)
    if size <= 0:
        raise ValueError(f"a size must be more than 0 bytes, got {text!r}")
    return size


@dataclass(frozen=True)
class RetentionPolicy:
    """What to keep; with several limits the log keeps the most any of them asks for.

    ``keep_since``: seconds of history (by the aggregations' flush times); ``keep_sequences``:
    at least this many of the newest blocks; ``keep_bytes``: at most about this many stored
    bytes of aggregations (every piece on every server), the newest ones. ``interval``: how
    often tlogserver applies the policy to a vdisk it serves.
    """

    keep_since: float | None = None
    keep_sequences: int | None = None
    keep_bytes: int | None = None
    interval: float = 600.0

    def __post_init__(self) -> None:
        if self.keep_since is None and self.keep_sequences is None and self.keep_bytes is None:
            raise ValueError("a retention policy needs keep_since, keep_sequences or "
                             "keep_bytes")
        if self.keep_sequences is not None and (isinstance(self.keep_sequences, bool)
                                                or not isinstance(self.keep_sequences, int)
                                                or self.keep_sequences < 1):
            raise ValueError(f"keep_sequences must be a whole number >= 1, got "
                             f"{self.keep_sequences!r}")
        if self.interval <= 0:
            raise ValueError(f"interval must be more than 0 seconds, got {self.interval!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> RetentionPolicy:
        """From YAML (``keep_since: 7d``, ``keep_sequences: 1000000``, ``keep_bytes: 10GiB``,
        ``interval: 10m``); ValueError names what is wrong."""
        if not isinstance(data, Mapping):
            raise ValueError(f"retention must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {"keep_since", "keep_sequences", "keep_bytes", "interval"}
        if unknown:
            raise ValueError(f"retention: unknown key(s) {', '.join(sorted(unknown))} (known: "
                             "keep_since, keep_sequences, keep_bytes, interval)")
        since, seqs = data.get("keep_since"), data.get("keep_sequences")
        size = data.get("keep_bytes")
        interval = data.get("interval", 600.0)
        if seqs is not None and (isinstance(seqs, bool) or not isinstance(seqs, int)):
            raise ValueError(f"retention: keep_sequences must be a whole number, got {seqs!r}")
        for name, value in (("keep_since", since), ("keep_bytes", size), ("interval", interval)):
            if value is not None and not isinstance(value, str | int | float):
                raise ValueError(f"retention: {name} must be a number or a string, got "
                                 f"{value!r}")
        return cls(None if since is None else parse_duration(since),  # type: ignore[arg-type]
                   seqs,
                   None if size is None else parse_size(size),  # type: ignore[arg-type]
                   parse_duration(interval))  # type: ignore[arg-type]

    def describe(self) -> str:
        parts = []
        if self.keep_since is not None:
            parts.append(f"since {self.keep_since:g} s")
        if self.keep_sequences is not None:
            parts.append(f"{self.keep_sequences} sequences")
        if self.keep_bytes is not None:
            parts.append(f"{self.keep_bytes} bytes")
        return "keep " + " or ".join(parts)


def first_kept(records: Sequence[ChainLink], policy: RetentionPolicy, now_ns: int,
               stored_factor: float) -> int:
    """The index of the oldest of ``records`` (oldest first) the policy keeps; the ones
    before it may be compacted. At least the newest record is always kept."""
    if not records:
        return 0
    keep = len(records) - 1
    if policy.keep_sequences is not None:
        blocks = 0
        i = len(records)
        while i > 0 and blocks < policy.keep_sequences:
            i -= 1
            blocks += records[i].count
        keep = min(keep, i)
    if policy.keep_since is not None:
        threshold = now_ns - int(policy.keep_since * 1e9)
        i = len(records)
        while i > 0 and records[i - 1].timestamp >= threshold:
            i -= 1
        keep = min(keep, i)
    if policy.keep_bytes is not None:
        stored = 0.0
        i = len(records)
        while i > 0 and stored + records[i - 1].size * stored_factor <= policy.keep_bytes:
            i -= 1
            stored += records[i].size * stored_factor
        keep = min(keep, i)
    return keep


def held_back(records: Sequence[ChainLink], position: tuple[int, int]) -> int:
    """The index of the first of ``records`` past ``position`` (epoch, sequence): a cut
    before it leaves a checkpoint from which ``position`` can still be restored."""
    for i, link in enumerate(records):
        if (link.epoch, link.last_sequence) > position:
            return i
    return len(records)


#: What disables retention for one vdisk whose server has a default policy.
_OFF = (False, "off", "none")


def parse_vdisk_retention(vdisks: Mapping[Any, Any] | None
                          ) -> dict[str, RetentionPolicy | None]:
    """The ``retention`` of each entry of a config's ``vdisks`` that has one: a policy, or
    None for ``retention: off`` (no compaction of that vdisk); ValueError names the key."""
    found: dict[str, RetentionPolicy | None] = {}
    for key, entry in (vdisks or {}).items():
        if not isinstance(entry, Mapping) or "retention" not in entry:
            continue
        value = entry["retention"]
        path = f"vdisks.{key}.retention"
        if value in _OFF or value is None:
            found[str(key)] = None
            continue
        try:
            found[str(key)] = RetentionPolicy.from_mapping(value)
        except ValueError as exc:
            raise ValueError(f"{path}: {str(exc).removeprefix('retention: ')}") from None
    return found


def server_policy(keep_since: str | None, keep_sequences: int | None, keep_bytes: str | None,
                  interval: str) -> RetentionPolicy | None:
    """The policy of tlogserver's --retention-* options; None when none is given."""
    if keep_since is None and keep_sequences is None and keep_bytes is None:
        parse_duration(interval)  # still checked
        return None
    return RetentionPolicy.from_mapping({
        key: value for key, value in (("keep_since", keep_since),
                                      ("keep_sequences", keep_sequences),
                                      ("keep_bytes", keep_bytes), ("interval", interval))
        if value is not None})
