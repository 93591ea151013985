"""The compiled per-block modules: loaded when built, never when stale or switched off.

``make install`` compiles the modules of `tlog.compiled.COMPILED_MODULES` with Cython; the
suite runs against whatever the installation has. .ci/run sets ``TLOG_EXPECT_COMPILED=1``
so that a build that silently fell back to pure Python fails there, and runs the protocol,
record, client and server tests a second time with ``TLOG_NO_EXTENSIONS=1``.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tlog import compiled

ROOT = Path(__file__).resolve().parents[1]

#: For a test that patches a method of a class the build compiles: a compiled class calls its
#: methods natively, past the patch, so such a test runs on make test's pure-Python pass.
PATCHES_COMPILED = pytest.mark.skipif(
    compiled.why_pure() is None,
    reason="patches a compiled class's method: runs with TLOG_NO_EXTENSIONS=1")

PROBE = """
import json, importlib, logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
from tlog import compiled
for name in compiled.COMPILED_MODULES:
    importlib.import_module(name)
print(json.dumps({"loaded": compiled.loaded(), "summary": compiled.summary(),
                  "files": {n: sys.modules[n].__file__ for n in compiled.COMPILED_MODULES}}))
"""


def probe(env_extra: dict[str, str], root: Path = ROOT) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != compiled.ENV_SWITCH}
    env.update(env_extra)
    env["PYTHONPATH"] = str(root)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=root, capture_output=True,
                          text=True, timeout=60, check=True)
    return json.loads(done.stdout), done.stderr


def source_of(name: str, root: Path = ROOT) -> Path:
    return root.joinpath(*name.split(".")).with_suffix(".py")


def built() -> bool:
    return all(compiled.extension_path(str(source_of(n))) for n in compiled.COMPILED_MODULES)


def test_the_build_compiled_every_listed_module_when_ci_expects_it() -> None:
    missing = [n for n in compiled.COMPILED_MODULES
               if compiled.extension_path(str(source_of(n))) is None]
    if os.environ.get("TLOG_EXPECT_COMPILED") == "1":
        assert missing == [], "make install fell back to pure Python for these"
    elif missing:
        pytest.skip(f"not built here: {missing}")


def test_this_process_runs_what_the_switch_and_the_build_say() -> None:
    for name in compiled.COMPILED_MODULES:
        module = importlib.import_module(name)
        extension = compiled.extension_path(str(source_of(name)))
        expected = extension is not None and not compiled.extensions_disabled()
        assert compiled.is_compiled(module) is expected, (name, module.__file__)


@pytest.mark.skipif(not built(), reason="the per-block modules are not compiled here")
def test_built_modules_load_compiled_and_the_switch_loads_the_py() -> None:
    got, _ = probe({})
    assert set(got["loaded"]) == set(compiled.COMPILED_MODULES)
    assert all(got["loaded"].values()), got
    assert got["summary"] == f"per-block modules compiled ({len(compiled.COMPILED_MODULES)})"
    assert all(f.endswith(".so") for f in got["files"].values())

    got, _ = probe({compiled.ENV_SWITCH: "1"})
    assert not any(got["loaded"].values()), got
    assert all(f.endswith(".py") for f in got["files"].values())
    assert "TLOG_NO_EXTENSIONS is set" in got["summary"]

    got, _ = probe({compiled.ENV_SWITCH: "0"})  # 0 means no: compiled
    assert all(got["loaded"].values()), got


@pytest.mark.skipif(not built(), reason="the per-block modules are not compiled here")
def test_an_extension_older_than_its_source_makes_every_module_pure(tmp_path: Path) -> None:
    for package in ("tlog", "tlogserver"):
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.c"))
    stale = compiled.COMPILED_MODULES[-1]
    source = source_of(stale, tmp_path)
    extension = compiled.extension_path(str(source))
    assert extension is not None
    later = os.stat(extension).st_mtime + 10
    os.utime(source, (later, later))  # the .py was edited after the build

    got, stderr = probe({}, tmp_path)
    # All or none: compiled modules call each other natively, so one stale module means
    # every listed module runs from its .py.
    assert not any(got["loaded"].values()), got
    assert got["files"][stale] == str(source)
    assert "per-block modules run as pure Python: the build is older than" in stderr
    assert stale in stderr and "make install" in stderr
    assert got["summary"].startswith("per-block modules in pure Python (the build is older")
