"""Where the Redis servers are (storage, block stores, standbys): ``host:port[@db]`` and
``redis://`` / ``rediss://`` URLs with credentials and TLS, parsed and checked, secrets read
from files and kept out of messages; and how every connection to one logs in and checks TLS.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

#: The oldest TLS version a ``rediss://`` connection accepts.
MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2


class StorageConfigError(ValueError):
    """Bad storage addresses or storage config; names the bad value or key."""


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
    """Where one Redis server listens, and how to log in to it: a storage server, a block
    store (``--output-redis``, ``tlog nbd --redis`` / ``--standby``, ``slave_server``). Every
    connection tlog makes to one takes its login and TLS from here (`ssl_context`,
    `redis_kwargs`).

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

    def ssl_context(self) -> ssl.SSLContext:
        """The client TLS context of a ``rediss://`` address, for the connections tlog makes
        itself (storage links, the bulk readers' sockets; pass ``server_hostname=host``): the
        server's certificate required and checked against ``ca`` (default: the system's trust
        store) and against the host name, the client certificate if any, TLS 1.2 at least.
        `redis_kwargs` asks redis-py for the same."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca)
        context.verify_mode = ssl.CERT_REQUIRED
        context.check_hostname = True
        context.minimum_version = MIN_TLS_VERSION
        if self.tls_cert is not None:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def redis_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``redis.Redis`` / ``redis.asyncio.Redis``, for every
        connection tlog makes through redis-py (block store, nbd backend and standby, repair,
        the walk script): the server, the database, the credentials, and TLS checked as
        strictly as `ssl_context` checks it (certificate required, host name checked, TLS 1.2
        at least, the address's CA and client certificate)."""
        kwargs: dict[str, Any] = {"host": self.host, "port": self.port, "db": self.db}
        if self.username is not None:
            kwargs["username"] = self.username
        if self.password is not None:
            kwargs["password"] = self.password
        if self.tls:
            kwargs.update(ssl=True, ssl_ca_certs=self.tls_ca, ssl_certfile=self.tls_cert,
                          ssl_keyfile=self.tls_key, ssl_cert_reqs="required",
                          ssl_check_hostname=True, ssl_min_version=MIN_TLS_VERSION)
        return kwargs


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


def split_items(items: str | Sequence[str]) -> list[str]:
    """Addresses from "a,b" or ["a", "b,c"] (repeated CLI flags may each hold a list)."""
    if isinstance(items, str):
        items = [items]
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def check_unique(addresses: Sequence[ServerAddress], where: str = "") -> None:
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
    addresses = [ServerAddress.parse(item) for item in split_items(items)]
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
    check_unique(addresses)
    return addresses


def describe_addresses(addresses: Sequence[ServerAddress]) -> str:
    """``127.0.0.1:6379..6384`` for sequential ports on one host, else a comma list."""
    if len(addresses) > 1:
        first = addresses[0]
        if all(
            replace(a, port=first.port) == first and a.port == first.port + i
            for i, a in enumerate(addresses)
        ):
            return first.describe(addresses[-1].port)
    return ", ".join(str(a) for a in addresses)
