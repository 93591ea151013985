"""The tlog client library: log a vdisk's writes to a tlogserver, never losing one.

- `tlog.client.tlogclient`: `TlogClient`, the asyncio client (buffer until FlushOK,
  resends, reconnects and failover, flush waits).
- `tlog.client.threaded`: `ThreadedClient`, the same in a background thread.
- `tlog.client.link`: one connection to a server, and the connection attempts.
- `tlog.client.settings`, `tlog.client.errors`, `tlog.client.stats`: addresses, TLS and
  tokens; the exceptions; counters and the response stream.
"""

from .errors import (
    ClientClosedError,
    HandshakeError,
    InternalServerError,
    InvalidRequestError,
    InvalidVdiskIDError,
    InvalidVersionError,
    NotOwnerError,
    SlaveSyncError,
    TlogClientError,
    UnauthorizedError,
    handshake_error,
)
from .settings import client_tls_context, load_token, parse_address, security_options
from .stats import ClientStats, ResponseStream
from .threaded import ThreadedClient
from .tlogclient import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_RESPONSE_SIZE,
    DEFAULT_MAX_UNFLUSHED_BYTES,
    DEFAULT_RECONNECT_DELAY,
    DEFAULT_RECONNECT_MAX_DELAY,
    DEFAULT_RESEND_TIMEOUT,
    TlogClient,
    encode_block,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT", "DEFAULT_MAX_RESPONSE_SIZE", "DEFAULT_MAX_UNFLUSHED_BYTES",
    "DEFAULT_RECONNECT_DELAY", "DEFAULT_RECONNECT_MAX_DELAY", "DEFAULT_RESEND_TIMEOUT",
    "ClientClosedError", "ClientStats", "HandshakeError", "InternalServerError",
    "InvalidRequestError", "InvalidVdiskIDError", "InvalidVersionError", "NotOwnerError",
    "ResponseStream",
    "SlaveSyncError", "ThreadedClient", "TlogClient", "TlogClientError", "UnauthorizedError",
    "client_tls_context",
    "encode_block", "handshake_error", "load_token", "parse_address", "security_options",
]
