"""Sizes and durations: one parser for every command and config file (tlog.units)."""

from __future__ import annotations

import pytest

from tlog.units import parse_duration, parse_size


@pytest.mark.parametrize(("text", "size"), [
    ("4096", 4096), (4096, 4096), ("0", 0), ("64M", 64 << 20), ("64m", 64 << 20),
    ("1G", 1 << 30), ("10GiB", 10 << 30), ("2T", 2 << 40), ("1.5K", 1536),
    ("500MB", 500_000_000), ("1kb", 1000), (" 16 MiB ", 16 << 20),
])
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "", "-1", "1X", "M", True, "1 G B"])
def test_what_is_not_a_size(text: str | int) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("15m", 900), ("2h", 7200), ("7d", 604800), ("1w", 604800), (3, 3.0),
    ("0.5", 0.5),
])
def test_durations(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "0", "-5s", "1y", False])
def test_what_is_not_a_duration(text: str | float) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)
