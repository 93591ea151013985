"""The per-block modules that run compiled, and the switch back to pure Python.

A compiled module is its own ``.py`` built by mypyc into an extension module next to it
(``wire.cpython-311-x86_64-linux-gnu.so`` beside ``wire.py``; setup.py builds the modules
listed here, and their shared code in ``tlog/native__mypyc.*.so``). Python's import system
prefers the extension. The ``.py`` files stay the reference and the fallback, and they are
loaded instead, for every module of the list at once:

- when ``TLOG_NO_EXTENSIONS`` is set (to anything but ``0`` or nothing);
- when an extension is older than its ``.py`` (a checkout or an edit after the build): a
  stale extension would run code that is no longer the source, so none is loaded, and a
  warning says to rebuild (``make install``);
- when an extension is missing (no compiler at install time, an unbuilt checkout).

All or none, because compiled modules call each other natively, and a compiled module next
to its pure twin would see two different classes of one name. `install` puts the finder
that does this first on ``sys.meta_path``; ``tlog/__init__.py`` calls it, so it is in place
before any module of ours is imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

log = logging.getLogger(__name__)

#: The modules setup.py compiles: the ones that run once per block or per frame.
COMPILED_MODULES = (
    # the wire: framing, block and response layouts, the sans-I/O state machines
    "tlog.protocol.pointers",
    "tlog.protocol.wire",
    "tlog.protocol.connection",
    # the server: receive, check and window loop, answers, budgets, the flusher
    "tlogserver.connection",
    "tlogserver.vdisk",
    "tlogserver.budget",
    "tlogserver.acks",
    "tlogserver.flusher",
    # the aggregation encoder and the record around it
    "tlog.record.layout",
    "tlog.record.aggregation",
    # the client: frame building, buffer bookkeeping, answers
    "tlog.client.buffer",
    "tlog.client.waiters",
    "tlog.client.tlogclient",
    "tlog.client.threaded",
    # the NBD plugin's write path
    "tlog.nbd.export",
    "tlog.nbd.disk",
)

ENV_SWITCH = "TLOG_NO_EXTENSIONS"


def extensions_disabled() -> bool:
    """Whether ``TLOG_NO_EXTENSIONS`` asks for the pure-Python modules."""
    return os.environ.get(ENV_SWITCH, "") not in ("", "0")


def extension_path(source: str) -> str | None:
    """The built extension beside a module's ``.py``, or None."""
    stem = source[:-len(".py")]
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if os.path.exists(stem + suffix):
            return stem + suffix
    return None


def is_compiled(module: ModuleType) -> bool:
    """Whether a module was loaded from an extension rather than its ``.py``."""
    spec = getattr(module, "__spec__", None)
    return spec is not None and isinstance(spec.loader, importlib.machinery.ExtensionFileLoader)


def loaded() -> dict[str, bool]:
    """The compiled modules imported so far, each with whether it runs compiled."""
    return {name: is_compiled(sys.modules[name])
            for name in COMPILED_MODULES if name in sys.modules}


def summary() -> str:
    """One line for a log or ``--version``: how the per-block modules run here."""
    state = loaded()
    if not state:
        return "per-block modules not loaded yet"
    compiled = sum(state.values())
    if compiled == len(state):
        return f"per-block modules compiled ({compiled})"
    reason = why_pure()
    why = f" ({reason})" if reason else ""
    if not compiled:
        return f"per-block modules in pure Python{why}"
    pure = ", ".join(name for name, on in state.items() if not on)
    return f"per-block modules compiled except {pure}"


def package_root() -> str:
    """The directory holding the ``tlog`` package (and, in a checkout, ``tlogserver``)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_path(name: str, root: str | None = None) -> str:
    """Where the ``.py`` of a module of ours is."""
    return os.path.join(root or package_root(), *name.split(".")) + ".py"


def why_pure(root: str | None = None) -> str | None:
    """Why the ``.py`` files run instead of the extensions; None when the extensions run."""
    if extensions_disabled():
        return f"{ENV_SWITCH} is set"
    missing, stale = [], []
    for name in COMPILED_MODULES:
        source = source_path(name, root)
        extension = extension_path(source)
        if extension is None:
            missing.append(name)
        elif os.stat(extension).st_mtime < os.stat(source).st_mtime:
            stale.append(name)
    if stale:
        return (f"the build is older than {', '.join(stale)}: rebuild with `make install` "
                "or `pip install -e .`")
    if missing and len(missing) < len(COMPILED_MODULES):
        return f"the build lacks {', '.join(missing)}: rebuild with `make install`"
    if missing:
        return "not compiled"
    return None


class PurePythonFinder(importlib.abc.MetaPathFinder):
    """Finds the ``.py`` of each compiled module when the extensions must not run."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname not in COMPILED_MODULES or not path:
            return None
        name = fullname.rpartition(".")[2]
        for entry in path:
            source = os.path.join(entry, name + ".py")
            if os.path.isfile(source):
                return importlib.util.spec_from_file_location(fullname, source)
        return None


def install() -> None:
    """Decide once, before any compiled module loads, whether the extensions run; when
    they must not, put a finder of the ``.py`` files first on ``sys.meta_path``."""
    if any(isinstance(f, PurePythonFinder) for f in sys.meta_path):
        return
    reason = why_pure()
    if reason is None:
        return
    if reason.startswith("the build"):
        log.warning("per-block modules run as pure Python: %s", reason)
    sys.meta_path.insert(0, PurePythonFinder(reason))


def build_state() -> str:
    """What ``make install`` reports: whether this installation's extensions would run."""
    reason = why_pure()
    if reason is None:
        return f"per-block modules compiled ({len(COMPILED_MODULES)} modules)"
    return f"per-block modules run as pure Python: {reason}"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the build state; with ``--stale``, exit 1 when a build exists but is out of date
    or incomplete (``make install`` then rebuilds). The Makefile runs it."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--stale"]:
        reason = why_pure()
        return 1 if reason is not None and reason.startswith("the build") else 0
    print(f"tlog: {build_state()}")
    return 0
