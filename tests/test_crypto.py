"""Tests for tlog.record.crypto: per-vdisk AEAD, key handling and the 0-Disk legacy cipher."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import cramjam
import pytest

from tlog.record.crypto import (
    KEY_SIZE,
    NONCE_SIZE,
    TAG_SIZE,
    CryptoError,
    IntegrityError,
    LegacyCipher,
    VdiskCipher,
    derive_vdisk_key,
    key_id,
    load_key_file,
    parse_key,
)
from tlog.record.erasure import ErasureCoder

from .vectors import VECTORS

STORAGE = VECTORS / "storage"
LEGACY_KEY = b"12345678901234567890123456789012"
LEGACY_NONCE_HEX = "37b8e8a308c354048d245f6d"
MASTER = bytes(range(32))
OTHER_MASTER = bytes(range(1, 33))


def _legacy_records() -> list[tuple[str, bytes, bytes]]:
    """(name, aggregation key, ciphertext) for every stored aggregation of the Go captures."""
    coder = ErasureCoder(4, 2)
    found = []
    for capture in ("n2", "ff30", "rand50"):
        servers = []
        for i in range(6):
            path = STORAGE / capture / f"server{i}.json"
            entries = json.loads(path.read_text())["entries"]
            servers.append({e["key_hex"]: e for e in entries if e["type"] == "string"})
        for key_hex in sorted(servers[0]):
            pieces = [bytes.fromhex(s[key_hex]["value_hex"]) for s in servers]
            found.append((f"{capture}-{key_hex[:8]}", bytes.fromhex(key_hex), coder.decode(pieces)))
    return found


LEGACY = _legacy_records()


# ------------------------------------------------------------------ VdiskCipher


def test_constants() -> None:
    """Sizes of AES-256-GCM as used everywhere."""
    assert (KEY_SIZE, NONCE_SIZE, TAG_SIZE) == (32, 12, 16)


def test_seal_open_roundtrip() -> None:
    """open(seal(x)) == x, the output carries a 12-byte nonce and a 16-byte tag."""
    cipher = VdiskCipher(MASTER, "vd1")
    for plaintext in (b"", b"a", bytes(range(256)) * 400):
        nonce, sealed = cipher.seal(plaintext, b"aad")
        assert len(nonce) == NONCE_SIZE
        assert len(sealed) == len(plaintext) + TAG_SIZE
        assert cipher.open(nonce, sealed, b"aad") == plaintext
        # A second instance with the same master key and vdisk reads it too.
        assert VdiskCipher(MASTER, "vd1").open(nonce, sealed, b"aad") == plaintext


def test_fresh_nonce_per_seal() -> None:
    """Sealing the same plaintext twice gives different nonces and ciphertexts."""
    cipher = VdiskCipher(MASTER, "vd1")
    n1, c1 = cipher.seal(b"same plaintext", b"aad")
    n2, c2 = cipher.seal(b"same plaintext", b"aad")
    assert n1 != n2
    assert c1 != c2


def test_tampering_detected() -> None:
    """Flipping any byte of ciphertext, tag, aad or nonce raises IntegrityError."""
    cipher = VdiskCipher(MASTER, "vd1")
    aad = b"vdisk vd1 seq 0..24"
    nonce, sealed = cipher.seal(b"payload bytes " * 3, aad)
    for i in range(len(sealed)):
        bad = bytearray(sealed)
        bad[i] ^= 0x01
        with pytest.raises(IntegrityError, match="authentication failed"):
            cipher.open(nonce, bytes(bad), aad)
    for i in range(len(aad)):
        bad_aad = bytearray(aad)
        bad_aad[i] ^= 0x80
        with pytest.raises(IntegrityError):
            cipher.open(nonce, sealed, bytes(bad_aad))
    with pytest.raises(IntegrityError):
        cipher.open(bytes(NONCE_SIZE), sealed, aad)
    with pytest.raises(IntegrityError):
        cipher.open(nonce, sealed[: TAG_SIZE - 1], aad)
    with pytest.raises(CryptoError, match="nonce must be 12 bytes"):
        cipher.open(nonce[:-1], sealed, aad)
    assert cipher.open(nonce, sealed, aad) == b"payload bytes " * 3


def test_wrong_key_or_vdisk_rejected() -> None:
    """A record sealed for one vdisk or master key does not open under another."""
    nonce, sealed = VdiskCipher(MASTER, "vd1").seal(b"secret", b"")
    with pytest.raises(IntegrityError):
        VdiskCipher(MASTER, "vd2").open(nonce, sealed, b"")
    with pytest.raises(IntegrityError):
        VdiskCipher(OTHER_MASTER, "vd1").open(nonce, sealed, b"")


def test_derived_keys_differ() -> None:
    """Each vdisk gets its own 32-byte key, deterministic, distinct from the master key."""
    k1 = derive_vdisk_key(MASTER, "vd1")
    assert len(k1) == KEY_SIZE
    assert k1 == derive_vdisk_key(MASTER, "vd1")
    assert k1 != derive_vdisk_key(MASTER, "vd2")
    assert k1 != derive_vdisk_key(MASTER, "vd")
    assert k1 != derive_vdisk_key(OTHER_MASTER, "vd1")
    assert k1 != MASTER
    with pytest.raises(CryptoError, match="master key must be 32 bytes"):
        derive_vdisk_key(MASTER[:31], "vd1")


def test_key_id() -> None:
    """key_id is a stable uint32 that differs between keys and matches its definition."""
    kid = key_id(MASTER)
    assert kid == key_id(bytes(range(32)))
    assert 0 <= kid < 2**32
    assert kid != key_id(OTHER_MASTER)
    digest = hashlib.blake2b(MASTER, digest_size=4, person=b"tlog-key-id").digest()
    assert kid == int.from_bytes(digest, "little")
    assert VdiskCipher(MASTER, "x").key_id == kid
    assert len({key_id(bytes([i]) * 32) for i in range(256)}) == 256


def test_cipher_rejects_bad_master_key() -> None:
    """VdiskCipher needs exactly 32 bytes."""
    with pytest.raises(CryptoError, match="32 bytes"):
        VdiskCipher(b"short", "vd1")


# ------------------------------------------------------------------ parse_key / load_key_file

ASCII_KEY = "0123456789abcdefghijklmnopqrstuv"


def test_parse_key_ascii_and_hex() -> None:
    """32 characters are used as their bytes; 64 hex digits are decoded; whitespace trimmed."""
    assert parse_key(ASCII_KEY, "flag") == ASCII_KEY.encode()
    assert parse_key(ASCII_KEY.encode() + b"\n", "file") == ASCII_KEY.encode()
    assert parse_key("  " + ASCII_KEY + "\r\n", "env") == ASCII_KEY.encode()
    assert parse_key(MASTER.hex(), "flag") == MASTER
    assert parse_key(MASTER.hex().upper() + "\n", "flag") == MASTER
    assert parse_key(LEGACY_KEY.decode(), "flag") == LEGACY_KEY


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("0123456789abcdefghijklmnopqrstu", "wrong length"),
        ("0123456789abcdefghijklmnopqrstuvw", "wrong length"),
        ("zz" * 32, "not valid hex"),
        ("00" * 31, "wrong length"),
        ("", "empty"),
        ("   \n", "empty"),
        ("é" * 32, "wrong length"),
        (b"\xff" * 32, "not UTF-8"),
    ],
)
def test_parse_key_errors_hide_key(key: str | bytes, problem: str) -> None:
    """Bad keys raise CryptoError naming the source and the problem, never the key."""
    with pytest.raises(CryptoError) as info:
        parse_key(key, "--priv-key")
    message = str(info.value)
    assert "--priv-key" in message
    assert problem in message
    text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
    if text.strip():
        assert text.strip() not in message
        assert text.strip()[:8] not in message


def test_load_key_file(tmp_path: Path) -> None:
    """Raw 32 bytes, ASCII with a newline and hex all load; problems name the path."""
    raw = tmp_path / "raw.key"
    raw.write_bytes(b"\n" + bytes(range(200, 231)))
    assert load_key_file(str(raw)) == b"\n" + bytes(range(200, 231))
    text = tmp_path / "text.key"
    text.write_text(ASCII_KEY + "\n")
    assert load_key_file(str(text)) == ASCII_KEY.encode()
    hexed = tmp_path / "hex.key"
    hexed.write_text(MASTER.hex() + "\n")
    assert load_key_file(str(hexed)) == MASTER
    short = tmp_path / "short.key"
    short.write_bytes(b"secretvalue")
    with pytest.raises(CryptoError) as info:
        load_key_file(str(short))
    assert str(short) in str(info.value)
    assert "secretvalue" not in str(info.value)
    missing = tmp_path / "missing.key"
    with pytest.raises(CryptoError, match="cannot read key file") as info:
        load_key_file(str(missing))
    assert str(missing) in str(info.value)
    huge = tmp_path / "huge.key"
    huge.write_bytes(b"a" * 10_000)
    with pytest.raises(CryptoError, match="too large"):
        load_key_file(str(huge))


# ------------------------------------------------------------------ LegacyCipher


def test_legacy_cipher_validation() -> None:
    """32-byte key and 12-byte nonce are required."""
    with pytest.raises(CryptoError, match="32 bytes"):
        LegacyCipher(b"k" * 31, bytes(12))
    with pytest.raises(CryptoError, match="nonce must be 12 bytes"):
        LegacyCipher(LEGACY_KEY, bytes(11))
    with pytest.raises(CryptoError, match="24 hex digits"):
        LegacyCipher.from_hex_nonce(LEGACY_KEY, "not hex")
    with pytest.raises(CryptoError, match="nonce must be 12 bytes"):
        LegacyCipher.from_hex_nonce(LEGACY_KEY, "00" * 11)


def test_legacy_roundtrip_and_static_nonce() -> None:
    """Same plaintext gives the same ciphertext (static nonce); tampering is detected."""
    cipher = LegacyCipher.from_hex_nonce(LEGACY_KEY, LEGACY_NONCE_HEX)
    sealed = cipher.seal(b"hello legacy")
    assert sealed == cipher.seal(b"hello legacy")
    assert len(sealed) == len(b"hello legacy") + TAG_SIZE
    assert cipher.open(sealed) == b"hello legacy"
    bad = bytearray(sealed)
    bad[0] ^= 1
    with pytest.raises(IntegrityError):
        cipher.open(bytes(bad))
    with pytest.raises(IntegrityError):
        cipher.open(sealed[:5])
    other = LegacyCipher(LEGACY_KEY, bytes(NONCE_SIZE))
    with pytest.raises(IntegrityError):
        other.open(sealed)


@pytest.mark.parametrize(
    ("name", "agg_key", "ciphertext"),
    LEGACY,
    ids=[r[0] for r in LEGACY],
)
def test_legacy_go_vectors(name: str, agg_key: bytes, ciphertext: bytes) -> None:
    """The Go server's stored ciphertext opens, decompresses to a capnp frame, reseals exactly."""
    assert hashlib.blake2b(ciphertext, digest_size=32).digest() == agg_key
    cipher = LegacyCipher.from_hex_nonce(LEGACY_KEY, LEGACY_NONCE_HEX)
    plaintext = cipher.open(ciphertext)
    frame = bytes(cramjam.snappy.decompress_raw(plaintext))
    # Stream framing: uint32 segment count - 1, then one uint32 size in words per segment.
    (count_minus_one,) = struct.unpack_from("<I", frame, 0)
    assert count_minus_one == 0, name
    (words,) = struct.unpack_from("<I", frame, 4)
    assert len(frame) == 8 + 8 * words, name
    assert b"The Go Tlog" in frame
    assert cipher.seal(plaintext) == ciphertext
    bad = bytearray(ciphertext)
    bad[len(bad) // 2] ^= 0x40
    with pytest.raises(IntegrityError):
        cipher.open(bytes(bad))
