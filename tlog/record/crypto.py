"""Keys and authenticated encryption for stored aggregations.

Two schemes live here:

* ``VdiskCipher``: tlog's own storage format. AES-256-GCM under a key derived per vdisk with
  HKDF-SHA256 from an operator's master key, a fresh random 96-bit nonce for every record and
  caller-supplied associated data.
* ``LegacyCipher``: 0-Disk's layout, AES-256-GCM with one static nonce for every record and no
  associated data. Reusing a GCM nonce is a known weakness; this exists only to read and write the
  reference's storage.
"""

from __future__ import annotations

import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "KEY_SIZE",
    "NONCE_SIZE",
    "TAG_SIZE",
    "CryptoError",
    "IntegrityError",
    "LegacyCipher",
    "VdiskCipher",
    "derive_vdisk_key",
    "key_id",
    "load_key_file",
    "parse_key",
]

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16

_HKDF_SALT = b"tlog storage v2"
_HKDF_INFO = b"tlog vdisk key\x00"
_KEY_ID_PERSON = b"tlog-key-id"
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


class CryptoError(Exception):
    """A key or nonce is unusable (wrong size, unreadable file, bad encoding)."""


class IntegrityError(CryptoError):
    """AES-GCM authentication failed: wrong key, or the data or associated data was altered."""


def _check_key(key: bytes, what: str) -> None:
    """Raise CryptoError unless ``key`` is KEY_SIZE bytes (the message never shows the key)."""
    if not isinstance(key, bytes | bytearray | memoryview):
        raise CryptoError(f"{what} must be bytes, got {type(key).__name__}")
    if len(key) != KEY_SIZE:
        raise CryptoError(f"{what} must be {KEY_SIZE} bytes, got {len(key)}")


def key_id(master_key: bytes) -> int:
    """Return a uint32 fingerprint of a master key, so a reader can pick the right key."""
    digest = hashlib.blake2b(master_key, digest_size=4, person=_KEY_ID_PERSON).digest()
    return int.from_bytes(digest, "little")


def parse_key(text_or_bytes: str | bytes, source: str) -> bytes:
    """Turn an operator's key into 32 bytes: 32 ASCII/UTF-8 bytes as-is, or 64 hex digits.

    Surrounding whitespace (a key file's trailing newline) is ignored. Errors name ``source``
    and say what is wrong, never the key itself.
    """
    if isinstance(text_or_bytes, bytes | bytearray):
        try:
            text = bytes(text_or_bytes).decode("utf-8")
        except UnicodeDecodeError:
            raise CryptoError(
                f"key from {source} is not UTF-8 text: expected {KEY_SIZE} characters "
                f"or {2 * KEY_SIZE} hex digits"
            ) from None
    elif isinstance(text_or_bytes, str):
        text = text_or_bytes
    else:
        raise CryptoError(
            f"key from {source} must be str or bytes, got {type(text_or_bytes).__name__}"
        )
    text = text.strip()
    raw = text.encode("utf-8")
    if len(raw) == KEY_SIZE:
        return raw
    if len(text) == 2 * KEY_SIZE:
        if not set(text) <= _HEX_DIGITS:
            raise CryptoError(
                f"key from {source} has {len(text)} characters but is not valid hex: "
                f"expected {KEY_SIZE} characters or {2 * KEY_SIZE} hex digits"
            )
        return bytes.fromhex(text)
    if not text:
        raise CryptoError(f"key from {source} is empty")
    raise CryptoError(
        f"key from {source} has the wrong length ({len(raw)} bytes after trimming whitespace): "
        f"expected {KEY_SIZE} characters or {2 * KEY_SIZE} hex digits"
    )


def load_key_file(path: str) -> bytes:
    """Read a master key file: exactly 32 raw bytes, or text accepted by ``parse_key``."""
    try:
        with open(path, "rb") as f:
            data = f.read(4096 + 1)
    except OSError as exc:
        raise CryptoError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    if len(data) > 4096:
        raise CryptoError(f"key file {path} is too large to hold a key")
    if len(data) == KEY_SIZE:
        return data
    return parse_key(data, f"key file {path}")


def derive_vdisk_key(master_key: bytes, vdisk_id: str) -> bytes:
    """Derive the vdisk's own AES key (HKDF-SHA256), so a leaked key exposes one vdisk only."""
    _check_key(master_key, "master key")
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_SIZE,
        salt=_HKDF_SALT,
        info=_HKDF_INFO + vdisk_id.encode("utf-8"),
    )
    return hkdf.derive(bytes(master_key))


class VdiskCipher:
    """AES-256-GCM under a per-vdisk derived key with a fresh random 96-bit nonce per call."""

    key_id: int

    def __init__(self, master_key: bytes, vdisk_id: str) -> None:
        """Derive the vdisk key once and keep the AESGCM object (this sits on the hot path)."""
        _check_key(master_key, "master key")
        self.key_id = key_id(bytes(master_key))
        self.vdisk_id = vdisk_id
        self._key = derive_vdisk_key(master_key, vdisk_id)
        self._aead = AESGCM(self._key)

    def seal(self, plaintext: bytes | memoryview, aad: bytes) -> tuple[bytes, bytes]:
        """Encrypt and authenticate; return (nonce, ciphertext + 16-byte tag)."""
        nonce = os.urandom(NONCE_SIZE)
        return nonce, self._aead.encrypt(nonce, plaintext, aad)

    def open(self, nonce: bytes, ciphertext: bytes | memoryview,
             aad: bytes | memoryview) -> bytes:
        """Check the tag and decrypt; IntegrityError if anything was altered or the key differs.

        ``ciphertext`` and ``aad`` may be views into a record (no copy of it).
        """
        if len(nonce) != NONCE_SIZE:
            raise CryptoError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
        if len(ciphertext) < TAG_SIZE:
            raise IntegrityError(
                f"authentication failed: ciphertext of {len(ciphertext)} bytes is shorter "
                f"than the {TAG_SIZE}-byte tag"
            )
        try:
            return self._aead.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise IntegrityError(
                f"authentication failed for vdisk {self.vdisk_id!r} "
                f"(key id {self.key_id:08x}): wrong key or altered data"
            ) from None


class LegacyCipher:
    """0-Disk's layout: AES-256-GCM, the same static nonce for every record, no AAD.

    Reusing the nonce is a known weakness of the reference; use this only to read or write the
    reference's storage.
    """

    def __init__(self, priv_key: bytes, nonce: bytes) -> None:
        """Check sizes (32-byte key, 12-byte nonce) and keep the AESGCM object."""
        _check_key(priv_key, "legacy private key")
        if not isinstance(nonce, bytes | bytearray) or len(nonce) != NONCE_SIZE:
            size = len(nonce) if isinstance(nonce, bytes | bytearray) else type(nonce).__name__
            raise CryptoError(f"legacy nonce must be {NONCE_SIZE} bytes, got {size}")
        self._nonce = bytes(nonce)
        self._aead = AESGCM(bytes(priv_key))

    @classmethod
    def from_hex_nonce(cls, priv_key: bytes, nonce_hex: str) -> LegacyCipher:
        """Build from the reference's ``--nonce`` flag (24 hex digits)."""
        try:
            nonce = bytes.fromhex(nonce_hex.strip())
        except ValueError:
            raise CryptoError(
                f"legacy nonce must be {2 * NONCE_SIZE} hex digits, got {nonce_hex!r}"
            ) from None
        return cls(priv_key, nonce)

    def seal(self, plaintext: bytes) -> bytes:
        """Encrypt as the reference does: ciphertext followed by the 16-byte tag."""
        return self._aead.encrypt(self._nonce, plaintext, None)

    def open(self, ciphertext: bytes) -> bytes:
        """Check the tag and decrypt; IntegrityError on a wrong key or altered data."""
        if len(ciphertext) < TAG_SIZE:
            raise IntegrityError(
                f"authentication failed: ciphertext of {len(ciphertext)} bytes is shorter "
                f"than the {TAG_SIZE}-byte tag"
            )
        try:
            return self._aead.decrypt(self._nonce, ciphertext, None)
        except InvalidTag:
            raise IntegrityError(
                "authentication failed for a legacy record: wrong key or nonce, or altered data"
            ) from None
