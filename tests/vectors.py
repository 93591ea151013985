"""The 0-Disk v1.1.0-alpha-7 captures (tests/vectors/0disk-alpha7: data recorded from the Go
server and client), and small readers for them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VECTORS = Path(__file__).resolve().parent / "vectors" / "0disk-alpha7"
WIRE_CAPTURES = ("n2", "ff30", "rand50")
PRIV_KEY = b"12345678901234567890123456789012"
NONCE_HEX = "37b8e8a308c354048d245f6d"


def need_vectors() -> Path:
    """The vectors' folder; they ship with the repository, so their absence is a failure."""
    assert VECTORS.is_dir(), f"0-Disk vectors missing from {VECTORS}"
    return VECTORS


def wire(name: str) -> tuple[bytes, bytes, dict[str, Any]]:
    """(client-to-server bytes, server-to-client bytes, manifest) of a capture."""
    base = need_vectors() / "wire"
    return ((base / f"{name}.c2s.bin").read_bytes(), (base / f"{name}.s2c.bin").read_bytes(),
            json.loads((base / f"{name}.manifest.json").read_text()))
