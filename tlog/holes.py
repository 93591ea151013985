"""Holes in files: deallocating blocks of an image (a deleted block reads as zeroes, as a
restore and a served vdisk leave it) with fallocate(2), where the file system can."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's fallocate(2); None where there is none."""
    if not hasattr(os, "pwritev"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        func = libc.fallocate
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return func  # type: ignore[no-any-return]


_FALLOCATE = _load_fallocate()


def can_punch() -> bool:
    """Whether this system has fallocate(2) at all (a file system may still refuse)."""
    return _FALLOCATE is not None


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``length`` bytes at ``offset`` of a regular file, keeping its size: they
    read as zeroes. False where the file system (or libc) cannot; nothing changed then."""
    if _FALLOCATE is None:
        return False
    return _FALLOCATE(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0
