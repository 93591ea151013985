"""The tlog wire protocol, sans I/O: bytes in, events out, no sockets.

- `tlog.protocol.wire`: the hand-laid Cap'n Proto messages, both sides (blocks, responses,
  handshakes), byte-identical to what pycapnp and 0-Disk lay out; `tlog.protocol.pointers`
  the words and pointers they are made of.
- `tlog.protocol.connection`: `ServerConnection` and `ClientConnection`, the framing and
  message state machines the server, the client, the tests and the fuzzers share.
- `tlog.protocol.status`, `tlog.protocol.version`: status codes, operations, versions.
- `tlog.protocol.schema`: the Cap'n Proto schema, loaded once.

The names below are the connection API, re-exported for ``from tlog.protocol import ...``.
"""

from .connection import (
    DEFAULT_MAX_MESSAGE_SIZE,
    HASH_SIZE,
    ClientConnection,
    ForceFlush,
    Handshake,
    HandshakeResponse,
    ProtocolError,
    ServerConnection,
    WaitNbdSlaveSync,
    block_hash,
)
from .status import BlockStatus, HandshakeStatus, MessageType, Operation
from .version import CURRENT_VERSION, MIN_SUPPORTED_VERSION, Version
from .wire import Block, BlockResponse, encode_handshake

__all__ = [
    "CURRENT_VERSION", "DEFAULT_MAX_MESSAGE_SIZE", "HASH_SIZE", "MIN_SUPPORTED_VERSION", "Block",
    "BlockResponse", "BlockStatus", "ClientConnection", "ForceFlush", "Handshake",
    "HandshakeResponse", "HandshakeStatus", "MessageType", "Operation", "ProtocolError",
    "ServerConnection", "Version", "WaitNbdSlaveSync", "block_hash", "encode_handshake",
]
