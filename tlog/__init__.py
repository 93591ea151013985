"""tlog: a transaction log for virtual block devices, wire-compatible with 0-Disk's.

The layers, each a subpackage (docs/architecture.md draws them):

- `tlog.protocol`: the wire protocol, sans I/O (framing, messages, statuses).
- `tlog.record`: how an aggregation is sealed and stored (v3, v2 and legacy records, keys,
  erasure coding).
- `tlog.storage`: the k+m Redis-protocol storage servers, pools and the storage map.
- `tlog.client`: the client library an NBD server logs its writes with.
- `tlog.read`: reading a log back: walking and checking the chain, restore, verify,
  repair, rekey.
- `tlog.cli`: the ``tlog`` command.

The daemon is the separate package `tlogserver`, which the library never imports.

The names below are the public API, importable from ``tlog`` directly (loaded on first
use, so that ``import tlog.protocol`` stays cheap).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import compiled

# Before any module of ours loads: TLOG_NO_EXTENSIONS=1, or a stale build, means the .py.
compiled.install()

if TYPE_CHECKING:
    from .client import ClientClosedError, HandshakeError, ThreadedClient, TlogClient
    from .protocol import Block, BlockStatus, Operation
    from .read import ChainReader, DecodeError, Limiter, aggregations, restore, verify_chain
    from .record import Keyring, RecordOpener
    from .storage import StoragePool, any_pool_factory

_EXPORTS = {
    "TlogClient": "client", "ThreadedClient": "client", "ClientClosedError": "client",
    "HandshakeError": "client",
    "Block": "protocol", "BlockStatus": "protocol", "Operation": "protocol",
    "ChainReader": "read", "DecodeError": "read", "Limiter": "read", "aggregations": "read",
    "restore": "read", "verify_chain": "read",
    "Keyring": "record", "RecordOpener": "record",
    "StoragePool": "storage", "any_pool_factory": "storage",
}

__all__ = [
    "Block", "BlockStatus", "ChainReader", "ClientClosedError", "DecodeError", "HandshakeError",
    "Keyring", "Limiter", "Operation", "RecordOpener", "StoragePool", "ThreadedClient",
    "TlogClient", "aggregations", "any_pool_factory", "restore", "verify_chain",
]
assert sorted(__all__) == sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    package = _EXPORTS.get(name)
    if package is None:
        raise AttributeError(f"module 'tlog' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{package}"), name)
    globals()[name] = value
    return value
