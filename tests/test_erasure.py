"""Tests for tlog.record.erasure against the Go reference's stored pieces and random records."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from dataclasses import dataclass

import pytest

from tlog.record.erasure import ErasureCoder, ErasureError, gf_inv, gf_mul
from tlog.record.steps import run_now

from .vectors import VECTORS

STORAGE = VECTORS / "storage"
CAPTURES = ("n2", "ff30", "rand50")
K, M = 4, 2


@dataclass(frozen=True)
class StoredAggregation:
    """One aggregation as the Go server stored it: its key and the piece on each server."""

    capture: str
    key: bytes
    pieces: tuple[bytes, ...]

    @property
    def name(self) -> str:
        """Short id for parametrised tests."""
        return f"{self.capture}-{self.key.hex()[:8]}"


def _load_aggregations() -> list[StoredAggregation]:
    """Read every aggregation key from serverN.json of each capture."""
    found: list[StoredAggregation] = []
    for capture in CAPTURES:
        servers = []
        for i in range(K + M):
            path = STORAGE / capture / f"server{i}.json"
            entries = json.loads(path.read_text())["entries"]
            servers.append({e["key_hex"]: e for e in entries if e["type"] == "string"})
        for key_hex in sorted(servers[0]):
            pieces = tuple(bytes.fromhex(s[key_hex]["value_hex"]) for s in servers)
            found.append(StoredAggregation(capture, bytes.fromhex(key_hex), pieces))
    return found


AGGREGATIONS = _load_aggregations()
agg_params = pytest.mark.parametrize("agg", AGGREGATIONS, ids=[a.name for a in AGGREGATIONS])


def _blake(data: bytes) -> bytes:
    """BLAKE2b-256, the reference's aggregation key."""
    return hashlib.blake2b(data, digest_size=32).digest()


def _flip(piece: bytes, pos: int) -> bytes:
    """Return ``piece`` with one byte inverted."""
    b = bytearray(piece)
    b[pos] ^= 0xFF
    return bytes(b)


@pytest.fixture(scope="module")
def coder() -> ErasureCoder:
    """The reference's 4+2 coder (pyeclib-accelerated)."""
    return ErasureCoder(K, M)


@pytest.fixture(scope="module")
def numpy_coder() -> ErasureCoder:
    """The same geometry forced onto the pure numpy encoder."""
    return ErasureCoder(K, M, use_pyeclib=False)


# ------------------------------------------------------------------ Go vectors


def test_vectors_hold_the_six_aggregations() -> None:
    """The vector set holds the six aggregations of the three captures."""
    assert len(AGGREGATIONS) == 6
    assert {a.capture for a in AGGREGATIONS} == set(CAPTURES)


@agg_params
def test_vector_join_data_pieces(coder: ErasureCoder, agg: StoredAggregation) -> None:
    """Joining the data pieces gives len || ciphertext || padding, and decode returns it."""
    joined = b"".join(agg.pieces[:K])
    length = int.from_bytes(joined[:8], "little")
    record = joined[8 : 8 + length]
    assert _blake(record) == agg.key
    assert len(agg.pieces[0]) == -(-(8 + length) // K)
    assert coder.decode(list(agg.pieces)) == record
    assert coder.decode(list(agg.pieces[:K]) + [None] * M) == record


@agg_params
def test_vector_encode_reproduces_pieces(
    coder: ErasureCoder, numpy_coder: ErasureCoder, agg: StoredAggregation
) -> None:
    """Both encoders rebuild all six stored pieces byte for byte."""
    assert coder.uses_pyeclib
    assert not numpy_coder.uses_pyeclib
    record = coder.decode(list(agg.pieces))
    assert coder.encode(record) == list(agg.pieces)
    assert numpy_coder.encode(record) == list(agg.pieces)


@agg_params
def test_vector_any_two_missing(coder: ErasureCoder, agg: StoredAggregation) -> None:
    """With every pair of pieces missing, decode and reconstruct still work exactly."""
    record = coder.decode(list(agg.pieces))
    for gone in itertools.combinations(range(K + M), M):
        pieces = [None if i in gone else p for i, p in enumerate(agg.pieces)]
        assert coder.decode(pieces) == record, gone
        assert coder.reconstruct(pieces) == list(agg.pieces), gone


@agg_params
def test_vector_one_corrupt_piece(coder: ErasureCoder, agg: StoredAggregation) -> None:
    """One flipped byte in any piece: plain decode may lie, decode_verified finds the record."""
    record = coder.decode(list(agg.pieces))

    def check(rec: bytes) -> bool:
        return _blake(rec) == agg.key

    size = len(agg.pieces[0])
    for bad in range(K + M):
        for pos in (8 if bad == 0 else 0, size // 2, size - 1):
            pieces = list(agg.pieces)
            pieces[bad] = _flip(pieces[bad], pos)
            if bad < K and not (bad == K - 1 and pos == size - 1):
                # A flipped data byte inside the record goes unnoticed by the plain decode.
                assert coder.decode(pieces) != record
            assert coder.decode_verified(pieces, check) == record, (bad, pos)


def test_vector_two_corrupt_pieces_fail(coder: ErasureCoder) -> None:
    """Corrupting more pieces than the code can route around is reported clearly."""
    agg = AGGREGATIONS[0]
    pieces = list(agg.pieces)
    for bad in range(M + 1):
        pieces[bad] = _flip(pieces[bad], 10)
    with pytest.raises(ErasureError, match="no combination of pieces passes the check"):
        coder.decode_verified(pieces, lambda rec: _blake(rec) == agg.key)


# ------------------------------------------------------------------ random records

GEOMETRIES = [(4, 2), (1, 0), (2, 1), (3, 3), (10, 4)]
LENGTHS = [0, 1, 3, 4, 5, 100, 4097, 100_000]


@pytest.mark.parametrize(("k", "m"), GEOMETRIES)
def test_random_roundtrip(k: int, m: int) -> None:
    """Encode/decode/reconstruct random records of many lengths, both encoders agreeing."""
    rng = random.Random(k * 1000 + m)
    fast = ErasureCoder(k, m)
    slow = ErasureCoder(k, m, use_pyeclib=False)
    assert (fast.k, fast.m) == (k, m)
    for length in LENGTHS:
        record = rng.randbytes(length)
        pieces = fast.encode(record)
        assert len(pieces) == k + m
        assert all(isinstance(p, bytes) for p in pieces)
        assert {len(p) for p in pieces} == {-(-(8 + length) // k)}
        assert slow.encode(record) == pieces
        payload = b"".join(pieces[:k])
        assert payload[:8] == length.to_bytes(8, "little")
        assert payload[8 : 8 + length] == record
        assert payload[8 + length :] == bytes(len(payload) - 8 - length)
        assert fast.decode(pieces) == record
        for _ in range(3):
            gone = set(rng.sample(range(k + m), m))
            damaged = [None if i in gone else p for i, p in enumerate(pieces)]
            assert fast.decode(damaged) == record, (length, gone)
            assert slow.reconstruct(damaged) == pieces, (length, gone)


@pytest.mark.parametrize(("k", "m"), GEOMETRIES)
@pytest.mark.parametrize("pyeclib", [True, False], ids=["pyeclib", "numpy"])
def test_encoding_in_steps_gives_the_same_pieces(k: int, m: int, pyeclib: bool) -> None:
    """Parity computed a column range at a time (the event loop running between the
    ranges) is the parity of the whole record, byte for byte, and each range is a step."""
    rng = random.Random(k * 100 + m)
    coder = ErasureCoder(k, m, use_pyeclib=pyeclib)
    for length in [*LENGTHS, 3 * 4096 * k + 17]:
        record = rng.randbytes(length)
        steps = coder.encode_in_steps(record, step=4096)
        pauses = 0
        result: object = None
        while True:
            try:
                item = steps.send(result)
            except StopIteration as done:
                pieces = done.value
                break
            if item is None:
                pauses += 1
                result = None
            else:
                result = item.func(*item.args)
        assert [bytes(p) for p in pieces] == coder.encode(record), length
        assert pauses == (-(-len(pieces[0]) // 4096) if m else 0), length
        assert run_now(coder.encode_in_steps(record)) == pieces


def test_decode_accepts_bytes_like_pieces() -> None:
    """Pieces read into bytearrays or memoryviews decode too."""
    coder = ErasureCoder(4, 2)
    record = bytes(range(200))
    pieces = coder.encode(record)
    mixed = [bytearray(pieces[0]), None, memoryview(pieces[2]), pieces[3], pieces[4], None]
    assert coder.decode(mixed) == record  # type: ignore[arg-type]


def test_cauchy_matrix_entries() -> None:
    """Parity row i, data column j has coefficient 1/(i XOR j): probe with unit payloads."""
    k, m = 5, 3
    coder = ErasureCoder(k, m, use_pyeclib=False)
    piece_len = 8
    for j in range(k):
        # Build pieces by hand: data piece j holds a single 1 at offset 3, the others zero.
        data = [bytearray(piece_len) for _ in range(k)]
        data[j][3] = 1
        stack = [bytes(d) for d in data]
        full = coder.reconstruct(stack + [None] * m)
        for i in range(k, k + m):
            assert full[i][3] == gf_inv(i ^ j)
            assert full[i].count(0) == piece_len - 1


# ------------------------------------------------------------------ errors


def test_too_few_pieces() -> None:
    """Fewer than k present pieces is an ErasureError naming the counts."""
    coder = ErasureCoder(4, 2)
    pieces: list[bytes | None] = list(coder.encode(b"hello world"))
    pieces[0] = pieces[1] = pieces[5] = None
    with pytest.raises(ErasureError, match="only 3 of 6 pieces present"):
        coder.decode(pieces)
    with pytest.raises(ErasureError, match="only 3 of 6"):
        coder.reconstruct(pieces)
    with pytest.raises(ErasureError, match="only 3 of 6"):
        coder.decode_verified(pieces, lambda _: True)


def test_bad_piece_lists() -> None:
    """Wrong entry count, unequal lengths and an impossible length prefix are rejected."""
    coder = ErasureCoder(4, 2)
    pieces = coder.encode(b"x" * 50)
    with pytest.raises(ErasureError, match="expected 6 pieces"):
        coder.decode(pieces[:5])
    uneven = list(pieces)
    uneven[4] = uneven[4] + b"\x00"
    with pytest.raises(ErasureError, match="different lengths"):
        coder.decode(uneven)
    lying = list(pieces)
    lying[0] = (10_000).to_bytes(8, "little") + lying[0][8:]
    with pytest.raises(ErasureError, match="length prefix 10000 is impossible"):
        coder.decode(lying)
    too_short = list(pieces)
    too_short[0] = (1).to_bytes(8, "little") + too_short[0][8:]
    with pytest.raises(ErasureError, match="impossible"):
        coder.decode(too_short)
    with pytest.raises(ErasureError, match="empty"):
        coder.decode([b""] * 6)


def test_decode_verified_skips_truncated_piece() -> None:
    """A piece of the wrong length is routed around by decode_verified."""
    coder = ErasureCoder(4, 2)
    record = b"some record" * 30
    pieces = coder.encode(record)
    damaged = list(pieces)
    damaged[1] = damaged[1][:-1]
    assert coder.decode_verified(damaged, lambda rec: rec == record) == record


@pytest.mark.parametrize(("k", "m"), [(0, 2), (-1, 1), (4, -1), (200, 56), (True, 1)])
def test_bad_geometry(k: int, m: int) -> None:
    """k < 1, m < 0 or k + m > 255 is a ValueError."""
    with pytest.raises(ValueError, match="must be"):
        ErasureCoder(k, m)


def test_largest_geometry() -> None:
    """k + m = 255 is allowed and works with both encoders."""
    coder = ErasureCoder(250, 5)
    record = bytes(range(256)) * 8
    pieces = coder.encode(record)
    assert ErasureCoder(250, 5, use_pyeclib=False).encode(record) == pieces
    damaged: list[bytes | None] = list(pieces)
    for i in (0, 7, 100, 249, 252):
        damaged[i] = None
    assert coder.decode(damaged) == record


# ------------------------------------------------------------------ GF(2^8)


def _slow_mul(a: int, b: int) -> int:
    """Carry-less multiply reduced by 0x11D, bit by bit (independent reference)."""
    result = 0
    while b:
        if b & 1:
            result ^= a
        b >>= 1
        a <<= 1
        if a & 0x100:
            a ^= 0x11D
    return result


def test_gf_mul_matches_bitwise_reference() -> None:
    """gf_mul equals the bit-serial product for every pair of elements."""
    for a in range(256):
        for b in range(256):
            assert gf_mul(a, b) == _slow_mul(a, b), (a, b)
    assert gf_mul(2, 0x80) == 0x1D


def test_gf_inverse_and_field_laws() -> None:
    """a * inv(a) == 1 for all a != 0; commutative, associative, distributive (sampled)."""
    for a in range(1, 256):
        assert gf_mul(a, gf_inv(a)) == 1
        assert gf_inv(gf_inv(a)) == a
    rng = random.Random(7)
    for _ in range(2000):
        a, b, c = (rng.randrange(256) for _ in range(3))
        assert gf_mul(a, b) == gf_mul(b, a)
        assert gf_mul(gf_mul(a, b), c) == gf_mul(a, gf_mul(b, c))
        assert gf_mul(a, b ^ c) == gf_mul(a, b) ^ gf_mul(a, c)
    with pytest.raises(ValueError):
        gf_inv(0)
    with pytest.raises(ValueError):
        gf_mul(256, 1)


def test_a_failing_pyeclib_encode_falls_back_counted_and_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """pyeclib raising on an encode: the numpy coder gives the same pieces, every such
    encode is counted (tlogserver exposes it as a metric), and only the first is logged."""
    from tlog.record import erasure

    class Broken:
        def encode(self, payload: bytes) -> list[bytes]:
            raise RuntimeError("liberasurecode: out of memory")

    coder = ErasureCoder(4, 2)
    reference = ErasureCoder(4, 2, use_pyeclib=False)
    coder._driver = Broken()
    before = erasure.fallback_encodes()
    caplog.set_level("WARNING", logger="tlog.record.erasure")
    erasure._fallbacks = 0  # as in a fresh process: the first one is logged
    try:
        for size in (1, 4096, 100_000):
            record = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            assert coder.encode(record) == reference.encode(record)
        assert erasure.fallback_encodes() == 3
    finally:
        erasure._fallbacks = before  # the process-wide count as it was
    logged = [r for r in caplog.records if "pyeclib failed" in r.getMessage()]
    assert len(logged) == 1 and "out of memory" in logged[0].getMessage()
