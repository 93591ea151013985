"""The Cap'n Proto schema, loaded once through pycapnp (no generated code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import capnp

capnp.remove_import_hook()


def _schema_path() -> Path:
    # Installed: shipped inside the package. Source checkout: tlog/protocol/tlog_schema.capnp
    # is a symlink to schema/tlog_schema.capnp, the one file we edit.
    here = Path(__file__).resolve().parent
    for candidate in (here / "tlog_schema.capnp",
                      here.parents[1] / "schema" / "tlog_schema.capnp"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError("tlog_schema.capnp not found next to the tlog package")


SCHEMA_PATH = _schema_path()
schema: Any = capnp.load(str(SCHEMA_PATH))

HandshakeRequest: Any = schema.HandshakeRequest
HandshakeResponse: Any = schema.HandshakeResponse
TlogResponse: Any = schema.TlogResponse
TlogBlock: Any = schema.TlogBlock
TlogAggregation: Any = schema.TlogAggregation
Command: Any = schema.Command
