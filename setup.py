"""Build of the compiled per-block modules (the rest of the project is in pyproject.toml).

The modules listed in ``tlog/compiled.py`` are compiled from their own ``.py`` by mypyc
(mypy's compiler: the type hints they already have become native code; no second source)
into extensions beside them. The build is optional: without mypy or a C compiler, or with
``TLOG_NO_EXTENSIONS=1`` set at install time, tlog installs as pure Python and says so; the
same ``.py`` files run either way.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def compiled_modules() -> list[str]:
    """``COMPILED_MODULES`` of tlog/compiled.py, read without importing tlog."""
    tree = ast.parse((HERE / "tlog" / "compiled.py").read_text())
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == "COMPILED_MODULES"):
            return list(ast.literal_eval(node.value))
    raise SystemExit("tlog/compiled.py has no COMPILED_MODULES")


#: Why the last build fell back to pure Python (pip -q hides the build's output; make
#: install shows this file when the modules did not come out compiled).
WHY_PURE = HERE / "build" / "tlog-pure-python.txt"


def warn(message: str) -> None:
    line = f"tlog: {message}; installing the pure-Python modules only"
    print(line, file=sys.stderr)
    try:
        WHY_PURE.parent.mkdir(exist_ok=True)
        with WHY_PURE.open("a") as out:
            out.write(line + "\n")
    except OSError:
        pass


class OptionalBuildExt(build_ext):
    """build_ext that falls back to pure Python instead of failing the install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler, no headers: the .py files still work
            warn(f"could not compile the per-block modules ({exc})")

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:
            warn(f"could not compile {ext.name} ({exc})")


def extensions() -> list:
    WHY_PURE.unlink(missing_ok=True)
    if os.environ.get("TLOG_NO_EXTENSIONS", "") not in ("", "0"):
        warn("TLOG_NO_EXTENSIONS is set")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        warn("mypyc (from mypy) is not installed")
        return []
    sources = [str(Path(*name.split(".")).with_suffix(".py")) for name in compiled_modules()]
    try:
        # One group: the modules call each other natively through one shared library,
        # tlog/native__mypyc.*.so (in the package, so an editable install finds it too).
        # --follow-imports=silent: the modules compiled are checked; the others they import
        # (and their packages, which the build's isolated environment may not have, so
        # their types are Any) are read for types without failing the build.
        return mypycify(["--config-file", "pyproject.toml", "--follow-imports=silent",
                         *sources], opt_level="3", group_name="tlog.native")
    except BaseException as exc:  # mypyc exits on a type error: a bug of ours, not the user's
        warn(f"mypyc could not translate the per-block modules ({exc!r})")
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
