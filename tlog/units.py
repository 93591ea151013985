"""Sizes and durations as people write them, parsed the same way by every command and
config file: ``64M``, ``10GiB``, ``500MB``, ``4096``; ``90s``, ``15m``, ``7d``."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

SIZE_EXAMPLES = "4096, 64M, 10GiB, 500MB"


def parse_size(text: str | int) -> int:
    """Bytes (>= 0): a plain number, or with a suffix. ``K``, ``M``, ``G``, ``T`` and
    ``KiB`` ... ``TiB`` are powers of 1024 (a disk's ``64M`` is 64 MiB, as qemu-img and
    nbdkit read it); ``KB`` ... ``TB`` are powers of 1000. Raises ValueError."""
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, int):
        size = text
    else:
        found = _SIZE.match(str(text))
        if found is None:
            raise ValueError(f"not a size: {text!r} (examples: {SIZE_EXAMPLES})")
        number, unit, binary, byte = found.groups()
        decimal = bool(byte) and not binary and bool(unit)
        base = 1000 if decimal else 1024
        size = int(float(number) * base ** _POWERS[unit.lower()])
    if size < 0:
        raise ValueError(f"a size cannot be negative, got {text!r}")
    return size


def parse_duration(text: str | int | float) -> float:
    """Seconds (> 0) in ``"90s"``, ``"15m"``, ``"2h"``, ``"7d"``, ``"1w"`` or a plain
    number. Raises ValueError."""
    if isinstance(text, bool):
        raise ValueError(f"not a duration: {text!r}")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        found = _DURATION.match(str(text))
        if found is None:
            raise ValueError(f"not a duration: {text!r} (examples: 90s, 15m, 2h, 7d, 1w)")
        seconds = float(found.group(1)) * _SECONDS[found.group(2).lower()]
    if seconds <= 0:
        raise ValueError(f"a duration must be more than 0, got {text!r}")
    return seconds
