"""Systematic Reed-Solomon erasure coding in 0-Disk's legacy storage layout.

The code works over GF(2^8) with primitive polynomial 0x11D. The generator matrix is the
identity (k data rows) stacked on a Cauchy matrix whose entry for parity row ``i``
(``k <= i < k+m``) and data column ``j`` is ``1 / (i XOR j)``: ISA-L's "cauchy1" matrix, which
is what the Go reference writes. Encoding goes through pyeclib's ISA-L backend when it is
available and gives the same bytes (checked once per coder); decoding and reconstruction are
done here with numpy lookup tables.

A record is stored as ``uint64_le(len(record)) || record``, zero-padded to a multiple of ``k``
and cut into ``k`` equal data pieces, followed by ``m`` parity pieces.
"""

from __future__ import annotations

import itertools
import logging
import struct
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from .steps import Steps, Work

__all__ = ["ErasureCoder", "ErasureError", "fallback_encodes", "gf_inv", "gf_mul"]

log = logging.getLogger(__name__)

_POLY = 0x11D
_PREFIX = struct.Struct("<Q")
_PYECLIB_HEADER = 80  # liberasurecode's fragment header in front of every pyeclib fragment
_PLAN_CACHE_SIZE = 64
#: Bytes of each data piece whose parity `ErasureCoder.encode_in_steps` computes per step
#: (with k=4, 1 MiB of record: a quarter of a millisecond with ISA-L).
ENCODE_STEP = 256 * 1024

U8Array: TypeAlias = npt.NDArray[np.uint8]

#: Encodes (process-wide) that pyeclib failed and numpy did instead; the first one is logged.
_fallbacks = 0


def fallback_encodes() -> int:
    """How many encodes in this process fell back from pyeclib to the numpy coder (a metric:
    the bytes are the same, the CPU cost about 8 times higher)."""
    return _fallbacks


_driver_missing_logged = False


def _no_driver(reason: str) -> None:
    global _driver_missing_logged
    if not _driver_missing_logged:
        _driver_missing_logged = True
        log.warning("erasure coding: pyeclib's ISA-L backend is not usable (%s): the numpy "
                    "coder encodes instead (same pieces, about 8 times the CPU)", reason)


def _fell_back(reason: str) -> None:
    global _fallbacks
    _fallbacks += 1
    if _fallbacks == 1:
        log.warning("erasure coding: pyeclib failed (%s); this encode and any later one that "
                    "fails again use the numpy coder (same pieces, slower)", reason)


def _build_tables() -> tuple[list[int], list[int], U8Array, list[int]]:
    """Build exp/log tables (generator 2), the full product table and the inverse table."""
    exp = [0] * 512
    log = [0] * 256
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= _POLY
    for i in range(255, 512):
        exp[i] = exp[i - 255]
    exp_np = np.array(exp, dtype=np.int64)
    log_np = np.array(log, dtype=np.int64)
    mul = exp_np[log_np[:, None] + log_np[None, :]].astype(np.uint8)
    mul[0, :] = 0
    mul[:, 0] = 0
    inv = [0] + [exp[255 - log[a]] for a in range(1, 256)]
    return exp, log, mul, inv


_EXP, _LOG, _MUL, _INV = _build_tables()


def gf_mul(a: int, b: int) -> int:
    """Multiply two elements of GF(2^8) (polynomial 0x11D)."""
    if not (0 <= a < 256 and 0 <= b < 256):
        raise ValueError(f"GF(2^8) elements must be in 0..255, got {a} and {b}")
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def gf_inv(a: int) -> int:
    """Multiplicative inverse in GF(2^8); 0 has none."""
    if not 0 < a < 256:
        raise ValueError(f"only 1..255 have a GF(2^8) inverse, got {a}")
    return _INV[a]


def _gf_matrix_inverse(mat: U8Array) -> U8Array:
    """Invert a square matrix over GF(2^8) by Gauss-Jordan elimination (vectorised rows)."""
    n = mat.shape[0]
    aug = np.concatenate([mat.astype(np.uint8), np.eye(n, dtype=np.uint8)], axis=1)
    for col in range(n):
        nonzero = np.nonzero(aug[col:, col])[0]
        if nonzero.size == 0:
            raise ErasureError("piece matrix is singular (internal error)")
        pivot = col + int(nonzero[0])
        if pivot != col:
            aug[[col, pivot]] = aug[[pivot, col]]
        aug[col] = _MUL[_INV[int(aug[col, col])]][aug[col]]
        factors = aug[:, col].copy()
        factors[col] = 0
        rows = np.nonzero(factors)[0]
        if rows.size:
            aug[rows] ^= _MUL[factors[rows][:, None], aug[col][None, :]]
    return aug[:, n:].copy()


def _gf_matmul(a: U8Array, b: U8Array) -> U8Array:
    """Multiply two small matrices over GF(2^8)."""
    products = _MUL[a[:, :, None], b[None, :, :]]
    return np.bitwise_xor.reduce(products, axis=1).astype(np.uint8)


_PACKED_DTYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


class _LinearMap:
    """A precomputed GF(2^8) matrix applied to byte rows: out[t] = sum_r coeffs[t, r] * rows[r].

    Up to 8 output rows are computed together: for every input row one 256-entry table maps a
    byte to the products for all those outputs, packed side by side into one 16/32/64-bit word.
    That costs one table lookup per input byte instead of one per input byte and output row.
    """

    def __init__(self, coeffs: U8Array) -> None:
        """Build the packed lookup tables for ``coeffs`` (outputs x inputs)."""
        self.outputs = int(coeffs.shape[0])
        self.inputs = int(coeffs.shape[1])
        self._blocks: list[tuple[int, int, list[tuple[int, npt.NDArray[Any]]]]] = []
        for start in range(0, self.outputs, 8):
            block = coeffs[start : start + 8]
            count = int(block.shape[0])
            width = next(w for w in (1, 2, 4, 8) if w >= count)
            tables: list[tuple[int, npt.NDArray[Any]]] = []
            for r in range(self.inputs):
                column = block[:, r]
                if not column.any():
                    continue
                table = np.zeros((256, width), dtype=np.uint8)
                table[:, :count] = _MUL[column].T
                tables.append((r, table.view(_PACKED_DTYPES[width]).reshape(256)))
            self._blocks.append((count, width, tables))

    def apply(self, rows: Sequence[U8Array]) -> list[bytes]:
        """Return the output rows as bytes; all input rows must have the same length."""
        size = int(rows[0].shape[0])
        out: list[bytes] = []
        for count, width, tables in self._blocks:
            acc: npt.NDArray[Any] | None = None
            for r, table in tables:
                product = table.take(rows[r])
                if acc is None:
                    acc = product
                else:
                    acc ^= product
            if acc is None:
                out.extend(bytes(size) for _ in range(count))
                continue
            packed = acc.view(np.uint8).reshape(size, width)
            if width == 1:
                out.append(packed.tobytes())
            else:
                out.extend(packed[:, q].tobytes() for q in range(count))
        return out


class ErasureError(Exception):
    """Pieces cannot be decoded: too few present, inconsistent lengths or corrupt content."""


class ErasureCoder:
    """Encode records into k data + m parity pieces and decode them back from any k pieces."""

    k: int
    m: int

    def __init__(self, k: int, m: int, *, use_pyeclib: bool = True) -> None:
        """Validate the geometry, build the Cauchy matrix and set up the pyeclib encoder.

        ``use_pyeclib=False`` forces the pure numpy encoder (for tests and comparisons).
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k (number of data pieces) must be an integer >= 1, got {k!r}")
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"m (number of parity pieces) must be an integer >= 0, got {m!r}")
        if k + m > 255:
            raise ValueError(f"k + m must be at most 255 for GF(2^8), got {k} + {m} = {k + m}")
        self.k = k
        self.m = m
        self.n = k + m
        cauchy = np.array(
            [[_INV[i ^ j] for j in range(k)] for i in range(k, k + m)], dtype=np.uint8
        ).reshape(m, k)
        self._generator: U8Array = np.concatenate([np.eye(k, dtype=np.uint8), cauchy], axis=0)
        self._parity_map = _LinearMap(cauchy)
        self._plans: dict[tuple[tuple[int, ...], tuple[int, ...]], _LinearMap] = {}
        self._driver: Any = self._make_driver() if use_pyeclib else None

    @property
    def uses_pyeclib(self) -> bool:
        """True when encoding goes through pyeclib's ISA-L backend."""
        return self._driver is not None

    # ---------------------------------------------------------------- encoding

    def _make_driver(self) -> Any:
        """Return a pyeclib ISA-L Cauchy driver if it exists and agrees with numpy, else None."""
        if self.m == 0:
            return None
        try:
            from pyeclib.ec_iface import ECDriver

            driver = ECDriver(k=self.k, m=self.m, ec_type="isa_l_rs_cauchy")
            sample = bytes((i * 37 + 11) & 0xFF for i in range(self.k * 64))
            fragments = driver.encode(sample)
        except Exception as exc:
            _no_driver(f"{type(exc).__name__}: {exc}")
            return None
        expected = self._encode_numpy(sample)
        got = [bytes(f[_PYECLIB_HEADER:]) for f in fragments]
        if got != expected:
            _no_driver("its pieces differ from the reference code's")
            return None
        return driver

    def _encode_numpy(self, payload: bytes) -> list[bytes]:
        """Encode a payload whose length is a multiple of k with the pure numpy code path."""
        size = len(payload) // self.k
        data = np.frombuffer(payload, dtype=np.uint8).reshape(self.k, size)
        pieces = [payload[j * size : (j + 1) * size] for j in range(self.k)]
        pieces.extend(self._parity_map.apply(list(data)))
        return pieces

    def _payload(self, record: bytes) -> bytes:
        """Build ``uint64_le(len) || record || zero padding`` with a single copy of the record."""
        total = _PREFIX.size + len(record)
        pad = -total % self.k
        return b"".join((_PREFIX.pack(len(record)), record, bytes(pad)))

    def encode(self, record: bytes) -> list[bytes]:
        """Cut a record into k data pieces plus m parity pieces (0-Disk layout, byte for byte)."""
        return [bytes(piece) for piece in self.encode_views(record)]

    def encode_views(self, record: bytes) -> list[bytes | memoryview]:
        """`encode`, the pieces possibly as views into the coder's output (no copy of 1.5x
        the record): for a caller that writes them out, as the flusher does."""
        payload = self._payload(record)
        size = len(payload) // self.k
        if self._driver is not None:
            try:
                fragments = self._driver.encode(payload)
            except Exception as exc:
                _fell_back(f"{type(exc).__name__}: {exc}")
            else:
                if len(fragments) == self.n and all(
                        len(f) == _PYECLIB_HEADER + size for f in fragments):
                    return [memoryview(f)[_PYECLIB_HEADER:] for f in fragments]
                _fell_back(f"{len(fragments)} fragments of unexpected sizes")
        return list(self._encode_numpy(payload))

    def encode_in_steps(self, record: bytes,
                        step: int = ENCODE_STEP) -> Steps[list[bytes | memoryview]]:
        """`encode_views` as a stepped job (`tlog.record.steps`): the parity of ``step``
        bytes of each data piece at a time (parity is computed byte column by byte column,
        so the pieces are the same), the joins of the payload and of each parity piece as
        `Work`. For an event loop that must not stall on a 16 MB record: pyeclib keeps the
        GIL for much of a call that size, a thread would not help."""
        payload: bytes = yield Work(self._payload, (record,), len(record))
        size = len(payload) // self.k
        view = memoryview(payload)
        data: list[bytes | memoryview] = [view[j * size:(j + 1) * size] for j in range(self.k)]
        if not self.m:
            return data
        columns: list[list[bytes]] = [[] for _ in range(self.m)]
        for at in range(0, size, step):
            for i, part in enumerate(self._parity_of([d[at:at + step] for d in data])):
                columns[i].append(part)
            yield None
        parity: list[bytes | memoryview] = []
        for parts in columns:
            parity.append((yield Work(b"".join, (parts,), size)))
        return [*data, *parity]

    def _parity_of(self, rows: list[bytes | memoryview]) -> list[bytes]:
        """The m parity rows of k data rows of one length (pyeclib when it gives them)."""
        size = len(rows[0])
        if self._driver is not None:
            try:
                fragments = self._driver.encode(b"".join(rows))
            except Exception as exc:
                _fell_back(f"{type(exc).__name__}: {exc}")
            else:
                if len(fragments) == self.n and all(
                        len(f) == _PYECLIB_HEADER + size for f in fragments):
                    return [bytes(memoryview(f)[_PYECLIB_HEADER:]) for f in fragments[self.k:]]
                _fell_back(f"{len(fragments)} fragments of unexpected sizes")
        return self._parity_map.apply([np.frombuffer(r, dtype=np.uint8) for r in rows])

    # ---------------------------------------------------------------- decoding

    def _enough(self, pieces: Sequence[bytes | None]) -> list[int]:
        """Check the number of entries and of present pieces; return the present indices."""
        if len(pieces) != self.n:
            raise ErasureError(
                f"expected {self.n} pieces (k={self.k}, m={self.m}), got {len(pieces)}"
            )
        present = [i for i, p in enumerate(pieces) if p is not None]
        if len(present) < self.k:
            raise ErasureError(
                f"only {len(present)} of {self.n} pieces present, need at least k={self.k}"
            )
        return present

    def _rebuild(self, pieces: Sequence[bytes | None], targets: list[int]) -> list[bytes]:
        """Compute the pieces at indices ``targets`` from k present pieces (data ones first)."""
        present = self._enough(pieces)
        lengths = {len(p) for p in pieces if p is not None}
        if len(lengths) != 1:
            raise ErasureError(f"present pieces have different lengths: {sorted(lengths)}")
        if 0 in lengths:
            raise ErasureError("pieces are empty")
        if not targets:
            return []
        # Prefer data rows: the same servers tend to be missing, so the plan cache hits.
        chosen = tuple(sorted(present, key=lambda i: (i >= self.k, i))[: self.k])
        key = (chosen, tuple(targets))
        plan = self._plans.get(key)
        if plan is None:
            inverse = _gf_matrix_inverse(self._generator[list(chosen)])
            plan = _LinearMap(_gf_matmul(self._generator[targets], inverse))
            if len(self._plans) >= _PLAN_CACHE_SIZE:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan
        rows = []
        for i in chosen:
            piece = pieces[i]
            assert piece is not None
            rows.append(np.frombuffer(piece, dtype=np.uint8))
        return plan.apply(rows)

    def _data_pieces(self, pieces: Sequence[bytes | None]) -> list[bytes]:
        """Return the k data pieces, rebuilding missing ones from any k present pieces."""
        missing = [j for j in range(self.k) if pieces[j] is None] if len(pieces) == self.n else []
        rebuilt = iter(self._rebuild(pieces, missing))
        return [p if p is not None else next(rebuilt) for p in pieces[: self.k]]

    def _strip(self, data: list[bytes]) -> bytes:
        """Read the length prefix from the data pieces and return the record bytes."""
        size = len(data[0])
        total = size * self.k
        if total < _PREFIX.size:
            raise ErasureError(
                f"payload of {total} bytes is too short for the 8-byte length prefix"
            )
        head = b"".join(d[: _PREFIX.size] for d in data[: -(-_PREFIX.size // size)])
        (length,) = _PREFIX.unpack_from(head)
        end = _PREFIX.size + length
        if end > total or total - end >= self.k:
            raise ErasureError(
                f"length prefix {length} is impossible for {self.k} pieces of {size} bytes"
            )
        if self.k == 1:
            return data[0][_PREFIX.size : end]
        parts: list[memoryview] = []
        for j, piece in enumerate(data):
            lo = max(_PREFIX.size - j * size, 0)
            hi = min(end - j * size, size)
            if hi <= 0:
                break
            if lo < hi:
                parts.append(memoryview(piece)[lo:hi])
        return b"".join(parts)

    def decode(self, pieces: Sequence[bytes | None]) -> bytes:
        """Return the record from k+m pieces (None = missing); needs any k of them."""
        return self._strip(self._data_pieces(pieces))

    def decode_verified(
        self, pieces: Sequence[bytes | None], check: Callable[[bytes], bool]
    ) -> bytes:
        """Decode when pieces may be corrupt: try subsets of k pieces until ``check`` accepts."""
        first_checked = False
        try:
            record = self.decode(pieces)
            first_checked = True
            if check(record):
                return record
        except ErasureError:
            pass
        present = self._enough(pieces)
        combos = sorted(
            itertools.combinations(present, self.k),
            key=lambda c: sum(i >= self.k for i in c),
        )
        # The first combination is the one the plain decode above already used.
        for combo in combos[1:] if first_checked else combos:
            subset: list[bytes | None] = [None] * self.n
            for i in combo:
                subset[i] = pieces[i]
            try:
                record = self.decode(subset)
            except ErasureError:
                continue
            if check(record):
                return record
        raise ErasureError("no combination of pieces passes the check")

    def reconstruct(self, pieces: Sequence[bytes | None]) -> list[bytes]:
        """Return all k+m pieces with the missing ones rebuilt (to repair a storage server)."""
        missing = [i for i, p in enumerate(pieces) if p is None] if len(pieces) == self.n else []
        rebuilt = iter(self._rebuild(pieces, missing))
        return [bytes(p) if p is not None else next(rebuilt) for p in pieces]
