"""The crash-consistency soak of scripts/soak.py, short: 6,000 blocks, 3 kills -9.

``make soak`` runs the long one (100,000 blocks, 12 kills); this one runs with the tests.
The real client writes random blocks and deletes through a real tlogserver that is killed
and restarted under it; ``tlog restore`` must give the expected image and ``tlog verify``
must call the chain sound.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

from .redis_fixture import redis_server_path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"


def load_soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tlog_soak", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["tlog_soak"] = module
    spec.loader.exec_module(module)
    return module


def test_short_soak_with_kills_restores_the_expected_image(tmp_path: Path) -> None:
    if redis_server_path() is None:
        pytest.skip("redis-server is not on PATH (make redis installs it)")
    soak = load_soak()
    seed = random.randrange(100_000)
    result = soak.run_soak(tmp_path, blocks=6000, kills=3, indexes=1000, seed=seed, log=True)
    print("\n".join(result.lines()))
    assert result.kills == 3 and result.reconnects >= 3, result.lines()
    assert result.image_ok, f"seed {seed}: " + "; ".join(result.lines())
    assert result.verify_ok, f"seed {seed}: {result.verify_summary}"
    assert result.repair_ok and not result.warnings_after_repair.get(
        "aggregations missing pieces"), result.lines()
