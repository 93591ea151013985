"""Keeping the Python thread state of a thread Python did not start (nbdkit's workers).

For every call into the plugin, nbdkit's Python plugin makes the calling worker thread a
Python thread state and deletes it again afterwards (``PyGILState_Ensure`` / ``_Release``).
In Python 3.11 that maps and unmaps the state's frame stack every time: an ``mmap``, a
``munmap`` and a TLB shootdown on the other cores per NBD request. `keep` makes one more
``PyGILState_Ensure`` in the calling thread and never releases it, so the state lives as
long as the thread: a 4 KiB write cost the plugin about 48 us of CPU instead of 84
(docs/nbd.md). `release_gone` deletes the kept states of threads that have exited (an
NBD connection's workers end with it), so that connections coming and going leak nothing.

Only on CPython 3.11, the version this was measured and tested on; elsewhere both are
no-ops. Never call `keep` from a thread Python started: Python deletes such a thread's
state itself when it ends, and `release_gone` would delete it a second time.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

#: Whether states are kept here at all.
ENABLED = (sys.implementation.name == "cpython" and sys.version_info[:2] == (3, 11)
           and sys.platform.startswith("linux"))  # threads are found gone in /proc

_local = threading.local()
_lock = threading.Lock()
_kept: dict[int, int] = {}  # native thread id -> its PyThreadState*


def _api() -> ctypes.PyDLL:
    api = ctypes.pythonapi
    api.PyGILState_Ensure.restype = ctypes.c_int
    api.PyThreadState_Get.restype = ctypes.c_void_p
    api.PyThreadState_Clear.argtypes = [ctypes.c_void_p]
    api.PyThreadState_Delete.argtypes = [ctypes.c_void_p]
    return api


def keep() -> None:
    """Keep the calling thread's state until `release_gone` finds the thread gone (once per
    thread; cheap afterwards)."""
    if not ENABLED or getattr(_local, "kept", False):
        return
    _local.kept = True
    api = _api()
    api.PyGILState_Ensure()
    with _lock:
        # A state kept under this id belonged to a thread that has exited since (the id was
        # free for this one): it is deleted now rather than lost.
        stale = _kept.pop(threading.get_native_id(), None)
        _kept[threading.get_native_id()] = api.PyThreadState_Get()
    if stale is not None:
        _delete(api, stale)


def release_gone() -> tuple[int, int]:
    """Delete the kept states of threads that no longer exist (call with the GIL, i.e. from
    Python); (states still kept, states deleted now)."""
    if not ENABLED:
        return 0, 0
    with _lock:
        gone = [tid for tid in _kept if not os.path.exists(f"/proc/self/task/{tid}")]
        states = [_kept.pop(tid) for tid in gone]
        left = len(_kept)
    api = _api()
    for state in states:
        _delete(api, state)
    return left, len(states)


def _delete(api: ctypes.PyDLL, state: int) -> None:
    # Its thread has exited, so nothing runs on the state: clear it (its thread-local values
    # go with it), then free it.
    api.PyThreadState_Clear(state)
    api.PyThreadState_Delete(state)
