"""Who may open which vdisk: plain, token or mutual-TLS access, per vdisk.

The reference lets anyone who reaches the port write to any vdisk by naming it. Here each
vdisk says which of these it accepts (any one suffices):

- ``plain``: no authentication, as 0-Disk (its Go clients can do nothing else);
- ``token``: the handshake's ``token`` field (our addition) must be the vdisk's secret;
  the config holds only a salted hash of it (`hash_token`), compared in constant time;
- ``mtls``: the connection is TLS with a client certificate that the server's client CA
  signed and whose identity (subject CN, or a DNS or URI subject alternative name) is
  mapped to a pattern matching the vdisk (``tls_clients`` in the YAML file).

Vdisks without an entry get the top-level ``access`` setting (default ``plain``, for
compatibility; ``token`` or ``mtls`` are the production settings, see docs/security.md).

Also a small command to make tokens and their hashes::

    python -m tlogserver.access new-token --output vm-101.token   # prints the hash
    python -m tlogserver.access hash-token < vm-101.token
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import click

__all__ = [
    "ACCESS_MODES",
    "MIN_TOKEN_BYTES",
    "AccessConfigError",
    "AccessPolicy",
    "Decision",
    "VdiskAccess",
    "certificate_identities",
    "hash_token",
    "new_token",
    "parse_modes",
    "parse_policy",
    "verify_token",
]

ACCESS_MODES = ("plain", "token", "mtls")
#: Shortest token `hash_token` accepts: the hash is fast (a token is checked at every
#: handshake), so a token must be too long to guess, not merely hard to guess.
MIN_TOKEN_BYTES = 16
#: Longest token a handshake may carry; longer ones are refused without hashing them.
MAX_TOKEN_BYTES = 1024
_SCHEME = "sha256"
_SALT_BYTES = 16


class AccessConfigError(ValueError):
    """A bad access setting; the message names the key."""


# -- tokens ------------------------------------------------------------------------------


def new_token() -> str:
    """A fresh random token: 32 bytes from the OS, URL-safe base64 (43 characters)."""
    return base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()


def _digest(salt: bytes, token: bytes) -> bytes:
    return hmac.new(salt, token, hashlib.sha256).digest()


def hash_token(token: bytes | str, salt: bytes | None = None) -> str:
    """``sha256:<salt hex>:<HMAC-SHA256(salt, token) hex>``: what the config holds.

    A random salt per hash, so two vdisks with the same token do not show it. A fast hash
    is enough because tokens are random and long (`MIN_TOKEN_BYTES`): nobody guesses 128
    bits, however fast each guess. Refuses shorter tokens.
    """
    raw = token.encode() if isinstance(token, str) else bytes(token)
    if len(raw) < MIN_TOKEN_BYTES:
        raise ValueError(f"token too short: at least {MIN_TOKEN_BYTES} bytes (make one with "
                         "`python -m tlogserver.access new-token`)")
    if len(raw) > MAX_TOKEN_BYTES:
        raise ValueError(f"token too long: at most {MAX_TOKEN_BYTES} bytes")
    salt = os.urandom(_SALT_BYTES) if salt is None else salt
    return f"{_SCHEME}:{salt.hex()}:{_digest(salt, raw).hex()}"


@dataclass(frozen=True)
class TokenHash:
    """A parsed ``token_hash``."""

    salt: bytes
    digest: bytes = field(repr=False)

    @classmethod
    def parse(cls, text: object, where: str) -> TokenHash:
        if not isinstance(text, str):
            raise AccessConfigError(f"{where}: expected a string sha256:<salt>:<hash>")
        parts = text.strip().split(":")
        try:
            if len(parts) != 3 or parts[0] != _SCHEME:
                raise ValueError
            salt, digest = bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
            if not salt or len(digest) != hashlib.sha256().digest_size:
                raise ValueError
        except ValueError:
            raise AccessConfigError(
                f"{where}: expected sha256:<salt hex>:<64 hex digits>, as printed by "
                "`python -m tlogserver.access hash-token`") from None
        return cls(salt, digest)

    def matches(self, token: bytes) -> bool:
        """Whether ``token`` hashes to this; constant time in the token's content."""
        if len(token) > MAX_TOKEN_BYTES:
            return False
        return hmac.compare_digest(_digest(self.salt, token), self.digest)


def verify_token(token: bytes, token_hash: str) -> bool:
    """Whether ``token`` matches a ``token_hash`` string (see `hash_token`)."""
    return TokenHash.parse(token_hash, "token_hash").matches(token)


# -- certificates ----------------------------------------------------------------------


def certificate_identities(peercert: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The names a verified client certificate vouches for: subject CNs, then DNS and URI
    subject alternative names (``ssl.SSLSocket.getpeercert()``'s dict; empty: no cert)."""
    if not peercert:
        return ()
    names: list[str] = []
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.append(str(value))
    for kind, value in peercert.get("subjectAltName", ()):
        if kind in ("DNS", "URI"):
            names.append(str(value))
    return tuple(dict.fromkeys(names))


# -- the policy ----------------------------------------------------------------------------


def parse_modes(value: object, where: str) -> frozenset[str]:
    """``plain``, ``token,mtls`` or a YAML list of modes."""
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        items = [str(v).strip() for v in value]
    else:
        raise AccessConfigError(f"{where}: expected one or a list of {', '.join(ACCESS_MODES)}")
    items = [item for item in items if item]
    if not items:
        raise AccessConfigError(f"{where}: no access mode given ({', '.join(ACCESS_MODES)})")
    for item in items:
        if item not in ACCESS_MODES:
            raise AccessConfigError(f"{where}: unknown access mode {item!r} (known: "
                                    f"{', '.join(ACCESS_MODES)})")
    return frozenset(items)


@dataclass(frozen=True)
class VdiskAccess:
    """What one vdisk accepts."""

    modes: frozenset[str]
    token_hash: TokenHash | None = None


@dataclass(frozen=True)
class Decision:
    """The outcome of a handshake's access check; ``reason`` is safe to log."""

    allowed: bool
    how: str  # the mode that let the client in, or "" when refused
    reason: str


@dataclass(frozen=True)
class AccessPolicy:
    """Every vdisk's access rule, and which client certificates may open what."""

    default: VdiskAccess = VdiskAccess(frozenset({"plain"}))
    vdisks: Mapping[str, VdiskAccess] = field(default_factory=dict)
    #: certificate identity -> vdisk id patterns (shell-style: ``vm-1*``)
    tls_clients: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def rule(self, vdisk_id: str) -> VdiskAccess:
        return self.vdisks.get(vdisk_id, self.default)

    @property
    def modes_used(self) -> frozenset[str]:
        """Every mode some vdisk (or the default) accepts."""
        found = set(self.default.modes)
        for rule in self.vdisks.values():
            found |= rule.modes
        return frozenset(found)

    def certificate_allows(self, identities: Sequence[str], vdisk_id: str) -> bool:
        for identity in identities:
            for pattern in self.tls_clients.get(identity, ()):
                if fnmatch.fnmatchcase(vdisk_id, pattern):
                    return True
        return False

    def check(self, vdisk_id: str, token: bytes, identities: Sequence[str] | None) -> Decision:
        """May a client open ``vdisk_id`` with this token (b"": none) and this verified
        certificate (``identities``; None: not TLS, (): TLS without a certificate)?"""
        rule = self.rule(vdisk_id)
        if "plain" in rule.modes:
            return Decision(True, "plain", "plain access")
        if "mtls" in rule.modes and identities and self.certificate_allows(identities,
                                                                           vdisk_id):
            return Decision(True, "mtls", "client certificate")
        if "token" in rule.modes and rule.token_hash is not None and token:
            if rule.token_hash.matches(token):
                return Decision(True, "token", "token")
        reasons = []
        if "token" in rule.modes:
            if rule.token_hash is None:
                reasons.append("no token configured for it")
            else:
                reasons.append("wrong token" if token else "no token sent")
        if "mtls" in rule.modes:
            if identities is None:
                reasons.append("not a TLS connection")
            elif not identities:
                reasons.append("no client certificate")
            else:
                reasons.append(f"certificate {', '.join(identities)[:200]} not allowed")
        return Decision(False, "", f"needs {' or '.join(sorted(rule.modes))}: "
                                   f"{'; '.join(reasons)}")


def parse_policy(default: object, vdisks: object, tls_clients: object) -> AccessPolicy:
    """Build the policy from the top-level ``access``, the ``vdisks`` entries' ``access`` and
    ``token_hash`` (their other keys are the storage map's) and ``tls_clients``."""
    # A default without plain refuses unlisted vdisks unless a certificate allows them:
    # they have no token of their own.
    default_modes = parse_modes(default, "access")
    rules: dict[str, VdiskAccess] = {}
    if vdisks is not None:
        if not isinstance(vdisks, Mapping):
            raise AccessConfigError("vdisks: expected a mapping of vdisk -> settings")
        for key, entry in vdisks.items():
            vdisk_id = str(key)
            path = f"vdisks.{vdisk_id}"
            if entry is None:
                continue
            if not isinstance(entry, Mapping):
                raise AccessConfigError(f"{path}: expected a mapping")
            if "access" not in entry and "token_hash" not in entry:
                continue
            modes = (parse_modes(entry["access"], f"{path}.access") if "access" in entry
                     else default_modes)
            token_hash = None
            if entry.get("token_hash") is not None:
                token_hash = TokenHash.parse(entry["token_hash"], f"{path}.token_hash")
                if "token" not in modes:
                    raise AccessConfigError(f"{path}.token_hash: given, but its access "
                                            f"({', '.join(sorted(modes))}) does not include "
                                            "token")
            elif "token" in modes:
                raise AccessConfigError(f"{path}.token_hash: missing (access includes token)")
            rules[vdisk_id] = VdiskAccess(modes, token_hash)
    clients: dict[str, tuple[str, ...]] = {}
    if tls_clients is not None:
        if not isinstance(tls_clients, Mapping):
            raise AccessConfigError("tls_clients: expected a mapping of certificate name -> "
                                    "vdisk patterns")
        for key, value in tls_clients.items():
            path = f"tls_clients.{key}"
            if not isinstance(key, str) or not key:
                raise AccessConfigError(f"tls_clients: {key!r} is not a certificate name")
            patterns = [value] if isinstance(value, str) else value
            if (not isinstance(patterns, list) or not patterns
                    or not all(isinstance(p, str) and p for p in patterns)):
                raise AccessConfigError(f"{path}: expected a list of vdisk id patterns")
            clients[key] = tuple(patterns)
    return AccessPolicy(VdiskAccess(default_modes), rules, clients)


# -- the token command -------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Make vdisk access tokens and the hashes tlogserver's config holds."""


@main.command("new-token")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="Write the token to this new file (mode 0600) and print only its hash. "
                   "Without it, the token and its hash are printed.")
def new_token_command(output: str | None) -> None:
    """Make a random token; print the token_hash line for the vdisk's config entry."""
    token = new_token()
    if output:
        try:
            fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise click.UsageError(f"{output}: {exc.strerror}") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
    else:
        click.echo(f"token: {token}")
    click.echo(f"token_hash: {hash_token(token)}")


@main.command("hash-token")
@click.option("--token-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Read the token from this file (default: standard input).")
def hash_token_command(token_file: str | None) -> None:
    """Print the token_hash of a token read from a file or standard input (never an
    argument: command lines show in ps)."""
    if token_file:
        with open(token_file, "rb") as fh:
            data = fh.read(MAX_TOKEN_BYTES + 2)
    else:
        data = sys.stdin.buffer.read(MAX_TOKEN_BYTES + 2)
    try:
        click.echo(f"token_hash: {hash_token(data.strip())}")
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


if __name__ == "__main__":
    main(prog_name="python -m tlogserver.access")
