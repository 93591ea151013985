"""The nbdkit Python plugin that serves one vdisk through `tlog.nbd.disk.LoggedDisk`.

Run by ``tlog nbd`` (which sets everything up): ``nbdkit python .../tlog/nbd/plugin.py
vdisk=ID server=HOST:PORT image=FILE size=BYTES ...``. nbdkit embeds the system Python, so
the environment of the ``tlog`` installation is made importable first: ``TLOG_NBD_PATH``
lists its ``sys.path`` (site directories get their ``.pth`` files, which editable installs
need). The tlog client's thread is started in ``after_fork``: nbdkit forks to run in the
background after ``get_ready``, and a thread started before that would not exist in the
child.

Keys: vdisk, server (repeatable), image, size, block-size, backend (file | redis), redis,
redis-key-prefix, readonly, write-timeout, flush-timeout, connect-timeout, tls, tls-ca,
tls-cert, tls-key, token-file, standby, standby-key-prefix, failover-timeout, state-file,
checkpoint-bytes, adopt, metrics-address.
"""

# ruff: noqa: E402  (the path set-up must run before anything of tlog is imported)
from __future__ import annotations

import os
import site
import sys


def _add_paths() -> None:
    entries = [p for p in os.environ.get("TLOG_NBD_PATH", "").split(os.pathsep) if p]
    before = list(sys.path)
    for entry in entries:
        if os.path.isdir(entry) and entry not in sys.path:
            site.addsitedir(entry)
    added = [p for p in sys.path if p not in before]
    sys.path[:] = added + before  # ours first: the system's packages must not shadow them


_add_paths()

import errno
import logging
import traceback
from typing import Any

import nbdkit  # type: ignore[import-not-found]  # provided by nbdkit's embedded Python

from tlog import compiled
from tlog.client import TlogClientError, parse_address
from tlog.nbd import threadstate
from tlog.nbd.backend import BackendError
from tlog.nbd.convergence import ExportRefused
from tlog.nbd.export import LOG_FORMAT, open_disk
from tlog.nbd.intent import IntentError
from tlog.nbd.metrics import serve_metrics
from tlog.nbd.settings import NbdSettings, SettingsError

API_VERSION = 2
_OPERATOR_ERRORS = (ExportRefused, BackendError, IntentError, TlogClientError)

_format_exception = traceback.format_exception


def _answer_in_one_line(exc: Any, *args: Any, **kwargs: Any) -> list[str]:
    """nbdkit's Python plugin prints what a callback raises through
    ``traceback.format_exception``: an OSError is the NBD error answer itself (EIO, EROFS,
    EINVAL), whose reason tlog logged already, and the others of `_OPERATOR_ERRORS` say
    what an operator must fix (after_fork: the export cannot be opened): one line, not a
    traceback. Anything else is a bug, printed whole."""
    value = args[0] if args else kwargs.get("value", exc)
    if isinstance(value, OSError):
        return [f"{value.strerror or value}\n"]
    if isinstance(value, _OPERATOR_ERRORS):
        return [f"{value}\n"]
    return _format_exception(exc, *args, **kwargs)


traceback.format_exception = _answer_in_one_line  # type: ignore[assignment]

_settings = NbdSettings()
_disk: Any = None


def config(key: str, value: str) -> None:
    try:
        _settings.set(key, value)
    except SettingsError as exc:
        nbdkit.set_error(errno.EINVAL)
        raise RuntimeError(str(exc)) from None


def config_complete() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format=LOG_FORMAT)
    try:
        _settings.check()
    except SettingsError as exc:
        raise RuntimeError(str(exc)) from None


def thread_model() -> int:
    # Requests run in parallel; LoggedDisk serialises the writes itself, in log order.
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def after_fork() -> None:
    global _disk
    _disk = open_disk(_settings)
    if _settings.metrics_address:
        host, port = parse_address(_settings.metrics_address)
        serve_metrics(host, port, lambda: _disk)
        logging.getLogger("tlog.nbd").info("metrics on http://%s:%d/metrics", host, port)
    logging.getLogger("tlog.nbd").info("%s", compiled.summary())
    logging.getLogger("tlog.nbd").info("serving %s", _settings.describe(_disk))


def cleanup() -> None:
    if _disk is not None:
        _disk.close()


def open(readonly: bool) -> Any:  # noqa: A001  (nbdkit's name)
    return _disk


def close(h: Any) -> None:
    # The connection's worker threads have ended: their kept thread states go too.
    left, released = threadstate.release_gone()
    nbdkit.debug(f"tlog: worker thread states: {released} released, {left} kept")


def get_size(h: Any) -> int:
    return int(h.size)


def block_size(h: Any) -> tuple[int, int, int]:
    return (1, int(h.block_size), 32 * 1024 * 1024)


def can_write(h: Any) -> bool:
    return not h.readonly


def can_flush(h: Any) -> bool:
    return True


def can_trim(h: Any) -> bool:
    return not h.readonly


def can_zero(h: Any) -> bool:
    return not h.readonly


def can_fua(h: Any) -> int:
    return int(nbdkit.FUA_NATIVE)


def can_multi_conn(h: Any) -> bool:
    # True: every connection shares one disk and one client, and a flush waits for every
    # block logged by any of them.
    return True


def pread(h: Any, buf: Any, offset: int, flags: int) -> None:
    threadstate.keep()
    try:
        buf[:] = h.pread(offset, len(buf))
    except OSError as exc:
        h.failed_requests += 1
        nbdkit.set_error(exc.errno or errno.EIO)
        raise


def pwrite(h: Any, buf: Any, offset: int, flags: int) -> None:
    threadstate.keep()
    _call(h.pwrite, buf, offset, bool(flags & nbdkit.FLAG_FUA))


def zero(h: Any, count: int, offset: int, flags: int) -> None:
    threadstate.keep()
    _call(h.zero, count, offset, bool(flags & nbdkit.FLAG_FUA))


def trim(h: Any, count: int, offset: int, flags: int) -> None:
    threadstate.keep()
    _call(h.trim, count, offset, bool(flags & nbdkit.FLAG_FUA))


def flush(h: Any, flags: int) -> None:
    threadstate.keep()
    _call(h.flush)


def _call(func: Any, *args: Any) -> None:
    try:
        func(*args)
    except OSError as exc:
        _disk.failed_requests += 1
        nbdkit.set_error(exc.errno or errno.EIO)
        raise
