"""What a client is given: tlogserver addresses, a TLS context, an access token."""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from typing import Any

# -- security --------------------------------------------------------------------------


def client_tls_context(ca_file: str | None = None, cert_file: str | None = None,
                       key_file: str | None = None) -> ssl.SSLContext:
    """A TLS context to reach a tlogserver: verifies its certificate and host name.

    ``ca_file`` holds the CA certificates to trust (PEM); without it, the system's trust
    store is used. ``cert_file`` (with ``key_file``, unless the key is in the same file)
    is this client's certificate, for servers that map client certificates to vdisks
    (mutual TLS). TLS 1.2 is the oldest version accepted.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    elif key_file:
        raise ValueError("a client key needs its certificate (cert_file)")
    return context


def load_token(path: str) -> bytes:
    """Read an access token from a file (surrounding whitespace, e.g. a newline, dropped).

    Tokens are secrets: pass them in a file or the environment, never as a command-line
    argument, which every local user can read in ``ps``.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read(4097)
    except OSError as exc:
        raise ValueError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    token = data.strip()
    if not token or len(data) > 4096:
        raise ValueError(f"token file {path}: expected one token of 1 to 4096 bytes")
    return token


def security_options(*, tls: bool = False, ca_file: str | None = None,
                     cert_file: str | None = None, key_file: str | None = None,
                     token_file: str | None = None) -> dict[str, Any]:
    """`TlogClient` keyword arguments from command-line style settings (for tools such as
    ``tlog send``): TLS when ``tls`` or any certificate file is given (system trust without
    ``ca_file``), and the token read from ``token_file``."""
    options: dict[str, Any] = {}
    if tls or ca_file or cert_file or key_file:
        options["tls"] = client_tls_context(ca_file, cert_file, key_file)
    if token_file:
        options["token"] = load_token(token_file)
    return options


# -- addresses -------------------------------------------------------------------------


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) to ``(host, port)``."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not host or not 0 < int(port) < 65536:
        raise ValueError(f"not a host:port address: {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def check_servers(servers: Iterable[str]) -> list[str]:
    found = [s.strip() for s in servers]
    if not found:
        raise ValueError("at least one tlogserver address is needed")
    for address in found:
        parse_address(address)
    return found
