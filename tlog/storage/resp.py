"""RESP, the Redis protocol, by hand where it is hot: packing the commands of a storage round
(`pack_commands`: 4 us for a round of MSET, LPUSH and LTRIM with a 25 KiB piece, against 14 us
for redis-py 8's ``Connection.pack_commands``; pieces of 256 KiB and more are not copied,
`pack_command_parts`), and the blocking connection the bulk reader's worker processes use
for MGET (`RespConnection`, TLS included). Replies on the asyncio side are parsed by hiredis
(`tlog.storage.link`).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from .address import ServerAddress

#: Arguments of at least this many bytes are left out of the copy `pack_command_parts`
#: makes of everything else: written as they are, after it (a 4 MB piece copied once more
#: holds the event loop for a millisecond and more).
BIG_ARG = 256 * 1024


def pack_commands(commands: Sequence[tuple[Any, ...]]) -> bytes:
    """RESP-encode commands of bytes, str and int arguments into one buffer (one write);
    joining copies a 25 KB value once, as the transport would anyway."""
    parts = pack_command_parts(commands)
    return b"".join(parts)  # (one bytes object joined is itself: no copy)


def pack_command_parts(commands: Sequence[tuple[Any, ...]]) -> list[bytes | memoryview]:
    """`pack_commands` as buffers to write one after the other: one buffer, unless an
    argument has `BIG_ARG` bytes or more, which is a buffer of its own (not copied)."""
    out: list[bytes | memoryview] = []
    parts: list[bytes | memoryview] = []
    append = parts.append
    for command in commands:
        append(b"*%d\r\n" % len(command))
        for arg in command:
            if type(arg) is not bytes:
                if isinstance(arg, int):
                    arg = b"%d" % arg
                elif isinstance(arg, str):
                    arg = arg.encode()
                elif isinstance(arg, memoryview):
                    arg = arg.cast("B")  # joined below without a copy of its own
                else:
                    arg = bytes(arg)
            append(b"$%d\r\n" % len(arg))
            if len(arg) >= BIG_ARG:
                out.append(b"".join(parts))
                out.append(arg)
                parts.clear()
                append(b"\r\n")
                continue
            append(arg)
            append(b"\r\n")
    out.append(b"".join(parts))
    return out


def pack_command(*args: bytes | str | int) -> bytes:
    """One command, RESP-encoded."""
    return pack_commands((args,))


class RespError(Exception):
    """An error reply, or a reply that is not RESP."""


class RespConnection:
    """A blocking connection to one Redis server, for MGET and little else: TLS, ACL user
    and database as the address says (`ServerAddress.ssl_context`, as every connection)."""

    def __init__(self, address: ServerAddress, timeout: float) -> None:
        sock = socket.create_connection((address.host, address.port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if address.tls:  # the handshake is bounded by the socket's timeout
                sock = address.ssl_context().wrap_socket(sock, server_hostname=address.host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.reader = self.sock.makefile("rb", buffering=1 << 20)
        try:
            if address.password is not None:
                username = address.username
                self.command("AUTH", *((username,) if username is not None else ()),
                             address.password)
            if address.db:
                self.command("SELECT", address.db)
        except BaseException:
            self.close()
            raise

    def command(self, *args: bytes | str | int) -> Any:
        """Send one command, return its reply."""
        self.sock.sendall(pack_command(*args))
        return self._reply()

    def mget(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The values of ``keys`` (None for a missing key), in one round trip."""
        self.sock.sendall(pack_command("MGET", *keys))
        return self.mget_reply(len(keys))

    def mget_reply(self, count: int) -> list[bytes | None]:
        """Read the reply of an MGET of ``count`` keys sent before."""
        reply = self._reply()
        if not isinstance(reply, list) or len(reply) != count:
            raise RespError("MGET reply of the wrong shape")
        return reply

    def _reply(self) -> Any:
        line = self.reader.readline()
        if not line.endswith(b"\r\n"):
            raise OSError("connection closed")
        kind, rest = line[:1], line[1:-2]
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = self.reader.read(size)
            if len(data) != size or self.reader.read(2) != b"\r\n":
                raise OSError("connection closed")
            return data
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self._reply() for _ in range(count)]
        if kind == b"-":
            raise RespError(rest.decode(errors="replace"))
        if kind in (b"+", b":"):
            return rest
        raise RespError(f"unexpected reply {line[:40]!r}")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()
