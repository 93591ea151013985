"""The storage pool: the k data + m parity Redis-protocol servers that hold a vdisk's log.

The layout is the reference's legacy one: piece ``i`` of an aggregation is stored on server
``i`` under the aggregation's 32-byte hash, and every server keeps the list
``last_hash_<vdiskID>`` of the newest hashes (LPUSH, trimmed to 6), so a reader can find the
head of the chain on any server that survived.

Three kinds of pools, chosen like the reference's ``AnyRedisPoolFactory``: a static list of
addresses (same servers for every vdisk), a YAML config mapping vdisks to storage clusters, or
the embedded in-memory storage.
"""

from __future__ import annotations

import abc
import asyncio
import ipaddress
import math
import re
import ssl
import urllib.parse
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import redis.asyncio
import yaml
from redis.exceptions import RedisError, ResponseError

__all__ = [
    "LAST_HASH_KEEP",
    "VDISK_ACCESS_KEYS",
    "ClusterPoolFactory",
    "MemoryPoolFactory",
    "MemoryStorageServer",
    "RedisStorageServer",
    "ServerAddress",
    "StaticPoolFactory",
    "StorageConfig",
    "StorageConfigError",
    "StorageError",
    "StoragePool",
    "StoragePoolFactory",
    "StorageServer",
    "any_pool_factory",
    "last_hash_key",
    "load_storage_config",
    "parse_addresses",
    "parse_storage_config",
]

#: How many hashes each server keeps in ``last_hash_<vdiskID>`` (the reference trims to 0..5).
LAST_HASH_KEEP = 6


class StorageError(Exception):
    """A storage server could not be reached or refused a command; names the server."""


class StorageConfigError(ValueError):
    """Bad storage addresses or storage config; names the bad value or key."""


def last_hash_key(vdisk_id: str) -> bytes:
    """The key of the list of a vdisk's newest aggregation hashes (one per server)."""
    return b"last_hash_" + vdisk_id.encode()


# ---------------------------------------------------------------------------------------------
# Addresses


_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _parse_port(text: str, what: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise StorageConfigError(f"{what}: port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise StorageConfigError(f"{what}: port {port} is out of range 1..65535")
    return port


#: Query parameters of a ``redis://`` / ``rediss://`` address.
_URL_PARAMS = frozenset({"ca", "cert", "key", "password_file"})


@dataclass(frozen=True)
class ServerAddress:
    """Where one storage server listens, and how to log in to it.

    Two spellings: 0-Disk's ``host:port[@db]`` (no credentials, plain TCP), and
    ``redis://[user[:password]@]host:port[/db]`` or ``rediss://...`` (TLS) with the query
    parameters ``ca`` (CA certificates to trust, PEM; default: the system's), ``cert`` and
    ``key`` (a client certificate, for servers with ``tls-auth-clients``) and
    ``password_file`` (read the password from a file instead of the address). With a user
    name the server is logged in to as that ACL user; a password alone is the
    ``requirepass`` password (ACL user ``default``). The password never appears in
    ``str()`` or ``repr()``, nor in error messages.
    """

    host: str
    port: int
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @classmethod
    def parse(cls, text: str) -> ServerAddress:
        """Parse ``host:port[@db]`` or a ``redis://`` / ``rediss://`` URL; IPv6 hosts go in
        brackets: ``[::1]:6379@2``."""
        if not isinstance(text, str):
            raise StorageConfigError(f"storage address {text!r}: expected a string host:port[@db]")
        body = text.strip()
        if body.lower().startswith(("redis://", "rediss://")):
            return cls._parse_url(body)
        what = f"storage address {text!r}"
        db = 0
        if "@" in body:
            body, db_text = body.rsplit("@", 1)
            if not db_text.isascii() or not db_text.isdigit():
                raise StorageConfigError(f"{what}: database {db_text!r} is not a number")
            db = int(db_text)
        host, port = _host_port(body, what)
        return cls(host, port, db)

    @classmethod
    def _parse_url(cls, text: str) -> ServerAddress:
        # Errors name the address without its password.
        try:
            url = urllib.parse.urlsplit(text)
            port_text = str(url.port) if url.port is not None else ""
        except ValueError as exc:
            raise StorageConfigError(f"storage address {_redact(text)!r}: {exc}") from None
        what = f"storage address {_redact(text)!r}"
        if not port_text:
            raise StorageConfigError(f"{what}: expected {url.scheme}://[user:password@]host:port")
        netloc_host = url.netloc.rpartition("@")[2]
        host, port = _host_port(netloc_host, what)
        db = 0
        path = url.path.strip("/")
        if path:
            if not path.isascii() or not path.isdigit():
                raise StorageConfigError(f"{what}: database {path!r} is not a number")
            db = int(path)
        if url.fragment:
            raise StorageConfigError(f"{what}: unexpected '#' part")
        params: dict[str, str] = {}
        for name, value in urllib.parse.parse_qsl(url.query, keep_blank_values=True):
            if name not in _URL_PARAMS:
                raise StorageConfigError(f"{what}: unknown parameter {name!r} (known: "
                                         f"{', '.join(sorted(_URL_PARAMS))})")
            if not value:
                raise StorageConfigError(f"{what}: parameter {name!r} is empty")
            params[name] = value
        tls = url.scheme.lower() == "rediss"
        if not tls and params.keys() & {"ca", "cert", "key"}:
            raise StorageConfigError(f"{what}: ca, cert and key need rediss:// (TLS)")
        if "key" in params and "cert" not in params:
            raise StorageConfigError(f"{what}: a client key needs its certificate (cert=...)")
        username = urllib.parse.unquote(url.username) if url.username else None
        password = urllib.parse.unquote(url.password) if url.password else None
        if "password_file" in params:
            if password is not None:
                raise StorageConfigError(f"{what}: give the password or password_file, "
                                         "not both")
            password = _read_secret(params["password_file"], what)
        return cls(host, port, db, username, password, tls, params.get("ca"),
                   params.get("cert"), params.get("key"))

    @property
    def is_url(self) -> bool:
        """Whether this address needs the URL spelling (credentials or TLS)."""
        return self.tls or self.username is not None or self.password is not None

    @property
    def server(self) -> tuple[str, int, int]:
        """(host, port, db): what makes two addresses the same storage."""
        return (self.host, self.port, self.db)

    def __str__(self) -> str:
        return self.describe()

    def describe(self, port_range_end: int | None = None) -> str:
        """The address as text, without the password; ``port_range_end`` writes the port as
        ``port..end`` (sequential servers)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f"{self.port}..{port_range_end}" if port_range_end is not None else str(self.port)
        if not self.is_url:
            return f"{host}:{port}" + (f"@{self.db}" if self.db else "")
        user = f"{urllib.parse.quote(self.username, safe='')}@" if self.username else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{user}{host}:{port}" + (f"/{self.db}" if self.db else "")

    def redis_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``redis.Redis`` / ``redis.asyncio.Redis``: the server, the
        database, the credentials and TLS (with host name checking)."""
        kwargs: dict[str, Any] = {"host": self.host, "port": self.port, "db": self.db}
        kwargs.update(self._auth_kwargs())
        if self.tls:
            kwargs["ssl"] = True
            kwargs.update(self._tls_kwargs())
        return kwargs

    def _auth_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.username is not None:
            kwargs["username"] = self.username
        if self.password is not None:
            kwargs["password"] = self.password
        return kwargs

    def _tls_kwargs(self) -> dict[str, Any]:
        return {"ssl_ca_certs": self.tls_ca, "ssl_certfile": self.tls_cert,
                "ssl_keyfile": self.tls_key, "ssl_cert_reqs": "required",
                "ssl_check_hostname": True, "ssl_min_version": ssl.TLSVersion.TLSv1_2}

    def connection(self, **options: Any) -> redis.asyncio.Connection:
        """A redis-py asyncio connection to this server (TLS and credentials included)."""
        kwargs: dict[str, Any] = {"host": self.host, "port": self.port, "db": self.db,
                                  **self._auth_kwargs(), **options}
        if self.tls:
            return redis.asyncio.SSLConnection(**self._tls_kwargs(), **kwargs)
        return redis.asyncio.Connection(**kwargs)


def _host_port(body: str, what: str) -> tuple[str, int]:
    """``host:port`` or ``[ipv6]:port``."""
    if body.startswith("["):
        end = body.find("]")
        if end < 0:
            raise StorageConfigError(f"{what}: missing ']' after the IPv6 address")
        host, rest = body[1:end], body[end + 1 :]
        if not _is_ipv6(host):
            raise StorageConfigError(f"{what}: {host!r} is not an IPv6 address")
        if not rest.startswith(":"):
            raise StorageConfigError(f"{what}: expected [ipv6]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = body.rpartition(":")
        if not sep:
            raise StorageConfigError(f"{what}: expected host:port[@db]")
        if ":" in host:
            if _is_ipv6(host):
                raise StorageConfigError(f"{what}: IPv6 addresses need brackets: [host]:port")
            raise StorageConfigError(f"{what}: {host!r} is not a valid host name")
        if not host:
            raise StorageConfigError(f"{what}: missing host")
        if not _HOSTNAME.match(host):
            raise StorageConfigError(f"{what}: {host!r} is not a valid host name")
    return host, _parse_port(port_text, what)


def _redact(text: str) -> str:
    """A redis URL with its password replaced by ``***``, for error messages."""
    scheme, sep, rest = text.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return text
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hostpart}"


def _read_secret(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            secret = fh.read(4097)
    except (OSError, UnicodeDecodeError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise StorageConfigError(f"{what}: cannot read password_file {path}: {detail}") from None
    secret = secret.strip("\r\n")
    if not secret or len(secret) > 4096:
        raise StorageConfigError(f"{what}: password_file {path} must hold one password")
    return secret


def _split_items(items: str | Sequence[str]) -> list[str]:
    """Addresses from "a,b" or ["a", "b,c"] (repeated CLI flags may each hold a list)."""
    if isinstance(items, str):
        items = [items]
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def _check_unique(addresses: Sequence[ServerAddress], where: str = "") -> None:
    """Two pieces on one server and database would overwrite each other under the same hash."""
    seen: set[tuple[str, int, int]] = set()
    for address in addresses:
        if address.server in seen:
            raise StorageConfigError(f"{where}storage address '{address}' is given twice")
        seen.add(address.server)


def parse_addresses(
    items: str | Sequence[str], required: int, autofill: bool = True
) -> list[ServerAddress]:
    """Parse exactly ``required`` (k+m) storage addresses from a comma-separated string or list.

    With ``autofill`` missing addresses are completed like the reference does: same host and
    database as the last address given, sequential ports after its port.
    """
    if required < 1:
        raise StorageConfigError(f"k+m = {required}: at least one storage server is needed")
    addresses = [ServerAddress.parse(item) for item in _split_items(items)]
    if not addresses:
        raise StorageConfigError(f"no storage servers given, k+m = {required} needed")
    if len(addresses) > required or (len(addresses) < required and not autofill):
        raise StorageConfigError(f"{len(addresses)} storage servers given, k+m = {required} needed")
    last = addresses[-1]
    for offset in range(1, required - len(addresses) + 1):
        port = last.port + offset
        if port > 65535:
            raise StorageConfigError(
                f"storage address '{last}': cannot autofill {required} servers, "
                f"port {port} is out of range"
            )
        addresses.append(replace(last, port=port))  # same host, db, credentials and TLS
    _check_unique(addresses)
    return addresses


def _describe_addresses(addresses: Sequence[ServerAddress]) -> str:
    """``127.0.0.1:6379..6384`` for sequential ports on one host, else a comma list."""
    if len(addresses) > 1:
        first = addresses[0]
        if all(
            replace(a, port=first.port) == first and a.port == first.port + i
            for i, a in enumerate(addresses)
        ):
            return first.describe(addresses[-1].port)
    return ", ".join(str(a) for a in addresses)


# ---------------------------------------------------------------------------------------------
# Servers


class StorageServer(abc.ABC):
    """One Redis-protocol server of a pool (or the in-memory equivalent)."""

    address: str

    @abc.abstractmethod
    async def store(
        self,
        items: Sequence[tuple[bytes, bytes]],
        list_key: bytes,
        push: Sequence[bytes],
        keep: int = LAST_HASH_KEEP,
    ) -> None:
        """SET every (key, value), LPUSH ``push`` in order onto ``list_key``, trim to ``keep``.

        ``push[-1]`` ends at the head of the list. One round trip; the commands run in order
        even when some fail (not a transaction); any failure raises :class:`StorageError`.
        """

    @abc.abstractmethod
    async def get(self, key: bytes) -> bytes | None:
        """The value under ``key``, None when missing."""

    @abc.abstractmethod
    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The values under ``keys`` (MGET), None for the missing ones."""

    @abc.abstractmethod
    async def list_range(self, list_key: bytes) -> list[bytes]:
        """The whole list under ``list_key``, head first (empty when missing)."""

    @abc.abstractmethod
    async def set_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """SET every (key, value): for repair tools that rewrite lost pieces."""

    async def delete_many(self, keys: Sequence[bytes]) -> None:
        """DEL every key: for `tlog rekey`, which removes records it re-encrypted.

        Not abstract, so that servers written for tests need not have it.
        """
        raise StorageError(f"storage server {self.address}: cannot delete keys")

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise :class:`StorageError` unless the server answers."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the connection; idempotent."""


def _check_keep(keep: int) -> None:
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")


def _store_commands(
    items: Sequence[tuple[bytes, bytes]], list_key: bytes, push: Sequence[bytes], keep: int
) -> list[tuple[Any, ...]]:
    """The commands of one :meth:`StorageServer.store`; one LPUSH with all values is the same
    as one LPUSH per value in order."""
    commands: list[tuple[Any, ...]] = []
    if len(items) == 1:
        key, value = items[0]
        commands.append((b"SET", key, value))
    elif items:
        commands.append(_mset(items))
    if push:
        commands.append((b"LPUSH", list_key, *push))
        commands.append((b"LTRIM", list_key, 0, keep - 1))
    return commands


def _mset(items: Sequence[tuple[bytes, bytes]]) -> tuple[Any, ...]:
    args: list[Any] = [b"MSET"]
    for key, value in items:
        args.append(key)
        args.append(value)
    return tuple(args)


def _pack(commands: Sequence[tuple[Any, ...]]) -> bytes:
    """RESP-encode commands of bytes and int arguments into one buffer (one write).

    A tenth of the cost of redis-py's generic packer, which matters at thousands of calls
    per second; joining copies a 25 KB value once, as the transport would anyway.
    """
    parts: list[bytes] = []
    append = parts.append
    for command in commands:
        append(b"*%d\r\n" % len(command))
        for arg in command:
            if type(arg) is not bytes:
                arg = b"%d" % arg if isinstance(arg, int) else bytes(arg)
            append(b"$%d\r\n" % len(arg))
            append(arg)
            append(b"\r\n")
    return b"".join(parts)


class _Request:
    """One batch of commands in flight on a link, and where its replies go."""

    __slots__ = ("count", "replies", "future")

    def __init__(self, count: int, future: asyncio.Future[list[Any]]) -> None:
        self.count = count
        self.replies: list[Any] = []
        self.future = future


class _Link:
    """One live connection: requests in flight in send order, and the task reading replies."""

    __slots__ = ("conn", "pending", "reader", "reason")

    def __init__(self, conn: redis.asyncio.Connection) -> None:
        self.conn = conn
        self.pending: deque[_Request] = deque()
        self.reader: asyncio.Task[None] | None = None
        self.reason: str | None = None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    text = str(exc)
    if isinstance(exc, TimeoutError) and not text:
        return "timed out"
    return text or type(exc).__name__


class RedisStorageServer(StorageServer):
    """A Redis/ARDB server reached through one pipelined connection (redis-py, hiredis).

    Every call is written on the same connection under a lock, in call order, and the
    replies are read by one reader task in that same order. So calls issued in order execute
    in order (a flush's SET lands before the next flush's LPUSH), many calls can be in flight
    at once (no round trip per call when many vdisks flush together), and a caller that is
    cancelled or times out never leaves unread replies behind for the next one.

    The connection is opened lazily and again after a failure: a call fails with
    :class:`StorageError` while the server is down and works again once it is back.
    """

    def __init__(self, address: ServerAddress, *, socket_timeout: float = 10.0) -> None:
        self.server_address = address
        self.address = str(address)
        self._timeout = socket_timeout
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link: _Link | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisStorageServer({self.address!r})"

    def _error(self, detail: str) -> StorageError:
        return StorageError(f"storage server {self.address}: {detail}")

    async def _connect(self) -> _Link:
        conn = self.server_address.connection(
            socket_connect_timeout=self._timeout,
            # Reads are unbounded on purpose: the reader task idles in a read to notice a
            # closed connection at once; callers bound the wait for their own replies.
            socket_timeout=None,
        )
        try:
            async with asyncio.timeout(self._timeout):
                await conn.connect()  # also the TLS handshake, AUTH and SELECT
        except (RedisError, OSError, TimeoutError) as exc:
            await conn.disconnect(nowait=True)
            raise self._error(f"cannot connect: {_reason(exc)}") from exc
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        link = _Link(conn)
        link.reader = asyncio.create_task(self._read_loop(link), name=f"redis {self.address}")
        self._link = link
        return link

    async def _read_loop(self, link: _Link) -> None:
        """Hand every reply to the oldest request in flight until the connection ends."""
        conn = link.conn
        pending = link.pending
        reason = "connection closed"
        try:
            while True:
                try:
                    reply = await conn.read_response(timeout=math.inf, disconnect_on_error=False)
                except ResponseError as exc:
                    reply = exc
                if not pending:
                    raise RedisError("reply without a request")
                request = pending[0]
                request.replies.append(reply)
                if len(request.replies) == request.count:
                    pending.popleft()
                    if not request.future.done():
                        request.future.set_result(request.replies)
        except asyncio.CancelledError:
            reason = link.reason or reason
            raise
        except Exception as exc:
            reason = f"connection lost: {_reason(exc)}"
        finally:
            self._drop(link, reason)
            await conn.disconnect(nowait=True)

    def _drop(self, link: _Link, reason: str) -> None:
        """Forget a broken link and fail everything still waiting on it."""
        if link.reason is None:
            link.reason = reason
        if self._link is link:
            self._link = None
        while link.pending:
            future = link.pending.popleft().future
            if not future.done():
                future.set_exception(self._error(link.reason))
        if link.reader is not None and link.reader is not asyncio.current_task():
            link.reader.cancel()

    async def _execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one write and return their replies; errors -> StorageError.

        One timeout bounds the whole call (waiting for the lock, connecting, sending,
        waiting for the replies): a server that stops answering costs at most that long.
        """
        if self._closed:
            raise self._error("closed")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # First use, or used again from a new event loop (tests): the old link, if any,
            # belongs to a loop that is gone.
            self._loop, self._lock, self._link = loop, asyncio.Lock(), None
        data = _pack(commands)
        future: asyncio.Future[list[Any]] = loop.create_future()
        link: _Link | None = None
        try:
            async with asyncio.timeout(self._timeout):
                async with self._lock:
                    link = self._link or await self._connect()
                    link.pending.append(_Request(len(commands), future))
                    try:
                        await link.conn.send_packed_command(data, check_health=False)
                    except BaseException as exc:
                        self._drop(link, f"send failed: {_reason(exc)}")
                        if future.done() and not future.cancelled():
                            future.exception()  # retrieved: we raise our own error
                        if isinstance(exc, RedisError | OSError):
                            raise self._error(f"send failed: {_reason(exc)}") from exc
                        raise
                replies = await future
        except TimeoutError:
            detail = f"no reply within {self._timeout:g} s"
            if link is not None:
                self._drop(link, detail)
            raise self._error(detail) from None
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise self._error(f"command failed: {reply}")
        return replies

    async def store(
        self,
        items: Sequence[tuple[bytes, bytes]],
        list_key: bytes,
        push: Sequence[bytes],
        keep: int = LAST_HASH_KEEP,
    ) -> None:
        _check_keep(keep)
        commands = _store_commands(items, list_key, push, keep)
        if commands:
            await self._execute(commands)

    async def get(self, key: bytes) -> bytes | None:
        reply: bytes | None = (await self._execute([(b"GET", key)]))[0]
        return reply

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        reply: list[bytes | None] = (await self._execute([(b"MGET", *keys)]))[0]
        return reply

    async def list_range(self, list_key: bytes) -> list[bytes]:
        reply: list[bytes] = (await self._execute([(b"LRANGE", list_key, 0, -1)]))[0]
        return reply

    async def set_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        if items:
            await self._execute([_mset(items)])

    async def delete_many(self, keys: Sequence[bytes]) -> None:
        if keys:
            await self._execute([(b"DEL", *keys)])

    async def ping(self) -> None:
        await self._execute([(b"PING",)])

    async def close(self) -> None:
        self._closed = True
        link, self._link = self._link, None
        if link is None or link.reader is None:
            return
        link.reason = link.reason or "closed"
        if self._loop is asyncio.get_running_loop():
            link.reader.cancel()
            try:
                await link.reader
            except asyncio.CancelledError:
                pass


class MemoryStorageServer(StorageServer):
    """A storage server inside this process: the embedded default storage.

    Same semantics as Redis for the commands used here, including WRONGTYPE errors when a
    key holds a value of the other kind. Lost when the process exits.
    """

    def __init__(self, address: str = "memory") -> None:
        self.address = address
        self._data: dict[bytes, bytes | list[bytes]] = {}

    def __repr__(self) -> str:
        return f"MemoryStorageServer({self.address!r})"

    def _wrongtype(self, key: bytes) -> StorageError:
        return StorageError(
            f"storage server {self.address}: command failed: WRONGTYPE key {key!r} holds "
            "a value of the wrong kind"
        )

    async def store(
        self,
        items: Sequence[tuple[bytes, bytes]],
        list_key: bytes,
        push: Sequence[bytes],
        keep: int = LAST_HASH_KEEP,
    ) -> None:
        _check_keep(keep)
        for key, value in items:
            self._data[bytes(key)] = bytes(value)
        if push:
            current = self._data.setdefault(bytes(list_key), [])
            if not isinstance(current, list):
                raise self._wrongtype(list_key)
            current[:0] = [bytes(value) for value in reversed(push)]
            del current[keep:]

    async def get(self, key: bytes) -> bytes | None:
        value = self._data.get(key)
        if isinstance(value, list):
            raise self._wrongtype(key)
        return value

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        values = [self._data.get(key) for key in keys]
        return [value if isinstance(value, bytes) else None for value in values]

    async def list_range(self, list_key: bytes) -> list[bytes]:
        value = self._data.get(list_key, [])
        if not isinstance(value, list):
            raise self._wrongtype(list_key)
        return list(value)

    async def set_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        for key, value in items:
            self._data[bytes(key)] = bytes(value)

    async def delete_many(self, keys: Sequence[bytes]) -> None:
        for key in keys:
            self._data.pop(bytes(key), None)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# Pools and factories


class StoragePool:
    """The k+m servers of one vdisk: piece ``i`` of every aggregation goes to ``servers[i]``."""

    def __init__(
        self, servers: Sequence[StorageServer], k: int, m: int, *, owns_servers: bool = True
    ) -> None:
        if k < 1 or m < 0:
            raise StorageConfigError(f"k={k}, m={m}: need k >= 1 and m >= 0")
        if len(servers) != k + m:
            raise StorageConfigError(f"{len(servers)} storage servers given, k+m = {k + m} needed")
        self.servers: list[StorageServer] = list(servers)
        self.k = k
        self.m = m
        # Pools handed out by a factory share its server clients; the factory closes them.
        self._owns_servers = owns_servers

    def __repr__(self) -> str:
        addresses = ", ".join(s.address for s in self.servers)
        return f"StoragePool(k={self.k}, m={self.m}, [{addresses}])"

    @property
    def is_memory(self) -> bool:
        """True when every server is the in-process storage."""
        return all(isinstance(s, MemoryStorageServer) for s in self.servers)

    async def close(self) -> None:
        """Close the servers if this pool owns them (not for pools from a factory)."""
        if self._owns_servers:
            await asyncio.gather(*(s.close() for s in self.servers))


def _check_k_m(k: int, m: int) -> None:
    if k < 1 or m < 0:
        raise StorageConfigError(f"k={k}, m={m}: need k >= 1 and m >= 0")


class StoragePoolFactory(abc.ABC):
    """Gives each vdisk its storage pool."""

    k: int
    m: int

    @abc.abstractmethod
    def pool_for(self, vdisk_id: str) -> StoragePool:
        """The pool of ``vdisk_id``; StorageConfigError if it has no storage cluster."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every server client this factory created."""

    @property
    def is_memory(self) -> bool:
        """True for the embedded in-memory storage."""
        return False

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for the logs."""

    def servers(self) -> list[StorageServer]:
        """Every server this factory can hand out a pool of (for health checks)."""
        return []


class StaticPoolFactory(StoragePoolFactory):
    """The same k+m servers for every vdisk."""

    def __init__(
        self,
        addresses: Sequence[ServerAddress],
        k: int,
        m: int,
        *,
        socket_timeout: float = 10.0,
    ) -> None:
        _check_k_m(k, m)
        if len(addresses) != k + m:
            raise StorageConfigError(
                f"{len(addresses)} storage servers given, k+m = {k + m} needed"
            )
        _check_unique(addresses)
        self.k, self.m = k, m
        self.addresses = list(addresses)
        servers = [RedisStorageServer(a, socket_timeout=socket_timeout) for a in addresses]
        self._pool = StoragePool(servers, k, m, owns_servers=False)

    def pool_for(self, vdisk_id: str) -> StoragePool:
        return self._pool

    def servers(self) -> list[StorageServer]:
        return list(self._pool.servers)

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self._pool.servers))

    def describe(self) -> str:
        return (
            f"{len(self.addresses)} redis servers {_describe_addresses(self.addresses)} "
            f"(k={self.k}, m={self.m})"
        )


class MemoryPoolFactory(StoragePoolFactory):
    """One in-memory pool shared by every vdisk (keys are hashes, lists are per vdisk)."""

    def __init__(self, k: int, m: int) -> None:
        _check_k_m(k, m)
        self.k, self.m = k, m
        servers = [MemoryStorageServer(f"memory-{i}") for i in range(k + m)]
        self._pool = StoragePool(servers, k, m, owns_servers=False)

    def pool_for(self, vdisk_id: str) -> StoragePool:
        return self._pool

    def servers(self) -> list[StorageServer]:
        return list(self._pool.servers)

    async def close(self) -> None:
        return None

    @property
    def is_memory(self) -> bool:
        return True

    def describe(self) -> str:
        return f"{self.k + self.m} in-memory storage servers (k={self.k}, m={self.m})"


@dataclass(frozen=True)
class StorageConfig:
    """Storage clusters and which vdisk uses which (from the YAML config file)."""

    clusters: dict[str, list[ServerAddress]]
    vdisks: dict[str, str]
    default_cluster: str | None = None

    def cluster_for(self, vdisk_id: str) -> str | None:
        """The cluster name of ``vdisk_id`` (or the default), None when it has none."""
        return self.vdisks.get(vdisk_id, self.default_cluster)


class ClusterPoolFactory(StoragePoolFactory):
    """Each vdisk gets the servers of its storage cluster, as the config says.

    Clients are shared per address across clusters and vdisks. A cluster with more than k+m
    servers uses its first k+m.
    """

    def __init__(
        self,
        config: StorageConfig,
        k: int,
        m: int,
        *,
        source: str | None = None,
        socket_timeout: float = 10.0,
    ) -> None:
        _check_k_m(k, m)
        self.k, self.m = k, m
        self.source = source
        self._socket_timeout = socket_timeout
        self._check(config)
        self._config = config
        self._servers: dict[ServerAddress, RedisStorageServer] = {}
        self._closed = False

    @property
    def config(self) -> StorageConfig:
        """The current vdisk -> cluster map."""
        return self._config

    def _check(self, config: StorageConfig) -> None:
        required = self.k + self.m
        for name, addresses in config.clusters.items():
            if len(addresses) < required:
                raise StorageConfigError(
                    f"storage_clusters.{name}.servers: {len(addresses)} servers given, "
                    f"k+m = {required} needed"
                )
        for vdisk_id, name in config.vdisks.items():
            if name not in config.clusters:
                raise StorageConfigError(
                    f"vdisks.{vdisk_id}.storage_cluster: unknown storage cluster {name!r}"
                )
        if config.default_cluster is not None and config.default_cluster not in config.clusters:
            raise StorageConfigError(
                f"default_storage_cluster: unknown storage cluster {config.default_cluster!r}"
            )

    def update(self, config: StorageConfig) -> None:
        """Swap the map (config reload); pools already handed out keep their servers."""
        self._check(config)
        self._config = config

    def _server(self, address: ServerAddress) -> RedisStorageServer:
        server = self._servers.get(address)
        if server is None:
            server = RedisStorageServer(address, socket_timeout=self._socket_timeout)
            self._servers[address] = server
        return server

    def pool_for(self, vdisk_id: str) -> StoragePool:
        if self._closed:
            raise StorageError("storage pool factory is closed")
        config = self._config
        name = config.cluster_for(vdisk_id)
        if name is None:
            raise StorageConfigError(
                f"vdisk {vdisk_id!r}: no storage cluster configured for it "
                "(and no default_storage_cluster)"
            )
        addresses = config.clusters[name][: self.k + self.m]
        servers = [self._server(a) for a in addresses]
        return StoragePool(servers, self.k, self.m, owns_servers=False)

    def servers(self) -> list[StorageServer]:
        """The servers of every configured cluster (those a vdisk may be given)."""
        if self._closed:
            return []
        seen: dict[ServerAddress, StorageServer] = {}
        for addresses in self._config.clusters.values():
            for address in addresses[: self.k + self.m]:
                seen.setdefault(address, self._server(address))
        return list(seen.values())

    async def close(self) -> None:
        self._closed = True
        servers = list(self._servers.values())
        await asyncio.gather(*(s.close() for s in servers))

    def describe(self) -> str:
        config = self._config
        default = f", default cluster {config.default_cluster}" if config.default_cluster else ""
        source = f" from {self.source}" if self.source else ""
        return (
            f"storage clusters{source}: {len(config.clusters)} clusters, "
            f"{len(config.vdisks)} vdisks{default} (k={self.k}, m={self.m})"
        )


# ---------------------------------------------------------------------------------------------
# Config file


_CLUSTER_KEYS = frozenset({"servers"})
#: A vdisk's access settings, next to its storage cluster in the same entry; tlogserver's
#: access control reads them (`tlogserver.access`), the storage map ignores them.
VDISK_ACCESS_KEYS = frozenset({"access", "token_hash"})
_VDISK_KEYS = frozenset({"storage_cluster"}) | VDISK_ACCESS_KEYS


def _name(key: object, path: str) -> str:
    """A cluster or vdisk name from a YAML key (YAML reads ``123`` as an int)."""
    if isinstance(key, str) and key:
        return key
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key)
    raise StorageConfigError(f"{path}: {key!r} is not a valid name")


def _mapping(value: object, path: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise StorageConfigError(f"{path}: expected a mapping, not {type(value).__name__}")
    return value


def _unknown_keys(section: Mapping[Any, Any], allowed: frozenset[str], path: str) -> None:
    for key in section:
        if key not in allowed:
            raise StorageConfigError(f"{path}.{key}: unknown key")


def _parse_cluster(name: str, value: object) -> list[ServerAddress]:
    path = f"storage_clusters.{name}"
    section = _mapping(value, path)
    _unknown_keys(section, _CLUSTER_KEYS, path)
    if "servers" not in section:
        raise StorageConfigError(f"{path}.servers: missing")
    raw = section["servers"]
    if isinstance(raw, str):
        raw = _split_items(raw)
    if not isinstance(raw, list):
        raise StorageConfigError(f"{path}.servers: expected a list of host:port[@db]")
    addresses = []
    for i, item in enumerate(raw):
        try:
            addresses.append(ServerAddress.parse(item))
        except StorageConfigError as exc:
            raise StorageConfigError(f"{path}.servers[{i}]: {exc}") from None
    _check_unique(addresses, f"{path}.servers: ")
    return addresses


def parse_storage_config(data: Mapping[str, Any], required: int | None = None) -> StorageConfig:
    """Build a :class:`StorageConfig` from the loaded YAML mapping.

    Reads ``storage_clusters``, ``vdisks`` and ``default_storage_cluster``; other top-level
    keys belong to the server's config and are ignored here, and so are the access settings
    of a vdisk's entry (`VDISK_ACCESS_KEYS`; an entry with only those uses the default
    cluster). ``required`` (k+m) is the
    minimum number of servers per cluster.
    """
    top = _mapping(data, "storage config")
    if top.get("storage_clusters") is None:
        raise StorageConfigError("storage_clusters: missing")
    clusters: dict[str, list[ServerAddress]] = {}
    for key, value in _mapping(top["storage_clusters"], "storage_clusters").items():
        name = _name(key, "storage_clusters")
        clusters[name] = _parse_cluster(name, value)

    vdisks: dict[str, str] = {}
    raw_vdisks = top.get("vdisks")
    for key, value in _mapping({} if raw_vdisks is None else raw_vdisks, "vdisks").items():
        vdisk_id = _name(key, "vdisks")
        path = f"vdisks.{vdisk_id}"
        section = _mapping({} if value is None else value, path)
        _unknown_keys(section, _VDISK_KEYS, path)
        cluster = section.get("storage_cluster")
        if cluster is None:
            if section.keys() & VDISK_ACCESS_KEYS:
                continue  # only access settings: the vdisk uses the default cluster
            raise StorageConfigError(f"{path}.storage_cluster: missing")
        cluster = _name(cluster, f"{path}.storage_cluster")
        if cluster not in clusters:
            raise StorageConfigError(f"{path}.storage_cluster: unknown storage cluster {cluster!r}")
        vdisks[vdisk_id] = cluster

    default = top.get("default_storage_cluster")
    if default is not None:
        default = _name(default, "default_storage_cluster")
        if default not in clusters:
            raise StorageConfigError(
                f"default_storage_cluster: unknown storage cluster {default!r}"
            )
    # Sizes last: a vdisk naming a missing cluster is the more basic mistake to report.
    for name, addresses in clusters.items():
        if required is not None and len(addresses) < required:
            raise StorageConfigError(
                f"storage_clusters.{name}.servers: {len(addresses)} servers given, "
                f"k+m = {required} needed"
            )
    return StorageConfig(clusters=clusters, vdisks=vdisks, default_cluster=default)


def load_storage_config(path: str, required: int | None = None) -> StorageConfig:
    """Read and check the storage part of a YAML config file; errors name the file."""
    try:
        with open(path, encoding="utf-8") as stream:
            data = yaml.safe_load(stream)
    except OSError as exc:
        raise StorageConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise StorageConfigError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        raise StorageConfigError(f"{path}: empty config file")
    try:
        return parse_storage_config(data, required)
    except StorageConfigError as exc:
        raise StorageConfigError(f"{path}: {exc}") from None


def any_pool_factory(
    *,
    k: int,
    m: int,
    addresses: str | Sequence[str] | None = None,
    config_path: str | None = None,
    allow_memory: bool = True,
    autofill: bool = True,
) -> StoragePoolFactory:
    """Pick the storage like the reference: addresses, else a config file, else in-memory."""
    _check_k_m(k, m)
    if addresses is not None and _split_items(addresses):
        return StaticPoolFactory(parse_addresses(addresses, k + m, autofill), k, m)
    if config_path:
        config = load_storage_config(config_path, required=k + m)
        return ClusterPoolFactory(config, k, m, source=config_path)
    if allow_memory:
        return MemoryPoolFactory(k, m)
    raise StorageConfigError(
        "no storage given: pass storage server addresses or a config file "
        "(in-memory storage is not allowed here)"
    )
