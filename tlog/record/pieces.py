"""How a record is read back from the storage pool: its pieces fetched, rebuilt from parity
when some are missing or corrupt, and checked against its hash (the key it is stored under,
BLAKE3 or BLAKE2b as the record's format says: `tlog.record.keying`).

The k data pieces are fetched first; the m parity pieces only when a data piece is missing
or the rebuilt record does not hash to its key. Up to m missing or corrupt pieces are
rebuilt. A server that fails once is not asked again during the same read. Opening the
record (decrypting, decoding) is `tlog.read.fetch`'s; walking the chain `tlog.read.chain`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import redis.asyncio

from tlog.storage import ServerAddress, StorageError, StoragePool

from .aggregation import NONCE_SIZE, RecordError, V2Header, is_v2_layout, parse_v2_header
from .crypto import TAG_SIZE
from .erasure import ErasureCoder, ErasureError
from .keying import record_key_matches
from .steps import off_loop

log = logging.getLogger(__name__)


_PREFIX = struct.Struct("<Q")
#: Whether a record is the one stored under a key (`record_key_matches`, or a reader's
#: own rule: `RecordOpener.key_matches`).
KeyCheck = Callable[[bytes, bytes], bool]


def piece_header(piece: bytes | None) -> tuple[V2Header, int] | None:
    """The header (v2 layout: a v2 or v3 record) at the start of piece 0 and the record's
    length, when the piece holds all of the header (a hint until the record is read whole
    and hash-checked)."""
    if piece is None or len(piece) < _PREFIX.size:
        return None
    (length,) = _PREFIX.unpack_from(piece)
    start = piece[_PREFIX.size:_PREFIX.size + length]
    if not is_v2_layout(start):
        return None
    try:
        head = parse_v2_header(start)
    except RecordError:
        return None
    return (head, length) if head.size + NONCE_SIZE + TAG_SIZE <= length else None


class DecodeError(Exception):
    """An aggregation that cannot be read back (too few pieces, corrupt, wrong key, broken
    chain); the message names the aggregation."""

    def __init__(self, message: str, key: bytes | None = None) -> None:
        super().__init__(message)
        self.key = key


class TooFewPieces(DecodeError):
    """Fewer than k pieces of the aggregation exist on servers that all answered: it cannot
    be rebuilt. Either pieces were lost, or its round never finished (the writer died
    while storing it; such a round was never acknowledged)."""


#: Run by storage server 0 (Redis EVAL): follow ``prev`` from KEYS[1] through at most
#: ARGV[1] records, returning for each the start of its piece 0 (GETRANGE: the 8-byte length,
#: then the v2-layout header up to its vdisk id and epoch, then as many bytes as a nonce and
#: a tag, so the header parser sees a plausible record). Piece 0 holds ``uint64 length ||
#: record ...``: the magic and version (2 or 3) at bytes 8-12, the flags at 14-15 (bit 0: an
#: 8-byte epoch follows the vdisk id), ``prev`` at 48-79, the vdisk id's length at 80-81
#: (Lua counts from 1). Read-only; a wrong type, a missing key, a record that is neither v2
#: nor v3 or the zero ``prev`` ends the run (a chain may go on from v2 records to v3 ones).
#: The walk still treats what it returns as piece 0's header: a hint checked when the record
#: is read whole.
_WALK_SCRIPT = """
local key = KEYS[1]
local out = {}
local zero = string.rep('\\0', 32)
for i = 1, tonumber(ARGV[1]) do
  local piece = redis.pcall('GETRANGE', key, 0, 255)
  if type(piece) ~= 'string' or #piece < 82 or string.sub(piece, 9, 12) ~= 'TLG2'
      or (string.byte(piece, 13) ~= 2 and string.byte(piece, 13) ~= 3) then
    break
  end
  local size = 82 + string.byte(piece, 81) + 256 * string.byte(piece, 82) + 28
  if string.byte(piece, 15) % 2 == 1 then
    size = size + 8
  end
  if size > #piece and #piece == 256 then
    piece = redis.pcall('GETRANGE', key, 0, size - 1)
    if type(piece) ~= 'string' then
      break
    end
  end
  out[#out + 1] = string.sub(piece, 1, size)
  key = string.sub(piece, 49, 80)
  if key == zero then
    break
  end
end
return out
"""


@dataclass
class Fetched:
    """A record read back and checked against its key."""

    record: bytes
    missing: list[int]  # servers that had no piece or were unreachable
    corrupt: list[int] = field(default_factory=list)  # servers whose piece was wrong
    parity_read: bool = False  # whether parity pieces had to be fetched


class PieceReader:
    """Fetches pieces from a pool, remembering servers that failed so they are not asked
    again (a dead server would cost a connection attempt per record). ``matches`` checks a
    record against its key (by default by the hash its format names)."""

    def __init__(self, pool: StoragePool, coder: ErasureCoder, timeout: float = 10.0,
                 matches: KeyCheck = record_key_matches) -> None:
        self.pool = pool
        self.coder = coder
        self.matches = matches
        self.down: set[int] = set()
        self.timeout = timeout
        self.scripting = True  # whether to try `header_run`
        self._script_client: redis.asyncio.Redis | None = None

    async def _get(self, index: int, key: bytes) -> bytes | None:
        if index in self.down:
            return None
        try:
            return await self.pool.servers[index].get(key)
        except StorageError as exc:
            log.warning("storage server %s unavailable, reading without it: %s",
                        self.pool.servers[index].address, exc)
            self.down.add(index)
            return None

    async def pieces(self, key: bytes, indexes: Sequence[int],
                     known: dict[int, bytes] | None = None) -> list[bytes | None]:
        """Pieces ``indexes`` of the record under ``key``, fetched concurrently except the
        ``known`` ones; None for a missing piece or an unreachable server."""
        if not known:
            return list(await asyncio.gather(*(self._get(i, key) for i in indexes)))
        wanted = [i for i in indexes if i not in known]
        got = dict(zip(wanted, await asyncio.gather(*(self._get(i, key) for i in wanted)),
                       strict=True))
        return [known[i] if i in known else got[i] for i in indexes]

    async def many(self, index: int, keys: Sequence[bytes]) -> list[bytes | None]:
        """Piece ``index`` of several records in one request (all None if it fails)."""
        if not keys:
            return []
        if index not in self.down:
            try:
                return await self.pool.servers[index].get_many(keys)
            except StorageError as exc:
                log.warning("storage server %s unavailable, reading without it: %s",
                            self.pool.servers[index].address, exc)
                self.down.add(index)
        return [None] * len(keys)

    async def first_piece(self, key: bytes) -> bytes | None:
        """Piece 0 alone: it starts with the record's header."""
        return await self._get(0, key)

    async def header(self, key: bytes) -> tuple[V2Header, int] | None:
        """The v2 header of the record under ``key`` and the record's length: from piece 0
        when it holds the header (a hint, not hash-checked), else from the record read
        whole (rebuilt from parity if need be); None when neither reads or it is not v2."""
        got = piece_header(await self.first_piece(key))
        if got is not None:
            return got
        try:
            record = (await self.fetch(key)).record
            return parse_v2_header(record), len(record)
        except (DecodeError, RecordError):
            return None

    async def header_run(self, key: bytes, limit: int) -> list[bytes] | None:
        """The v2 headers of up to ``limit`` records along the chain from ``key`` back, read
        by storage server 0 itself in one round trip (`_WALK_SCRIPT`): for each record, the
        start of its piece 0 up to the end of its header. The list stops early at a missing
        record, one that is not v2, or the first one. None when server 0 cannot run the
        script (no Redis, scripting disabled, unreachable): the caller walks piece by piece.
        """
        if not self.scripting or 0 in self.down:
            return None
        server = self.pool.servers[0]
        address = getattr(server, "server_address", None)
        if not isinstance(address, ServerAddress):
            self.scripting = False
            return None
        try:
            if self._script_client is None:
                self._script_client = redis.asyncio.Redis(
                    **address.redis_kwargs(), socket_timeout=self.timeout,
                    socket_connect_timeout=self.timeout)
            reply = await self._script_client.execute_command("EVAL", _WALK_SCRIPT, 1, key,
                                                              limit)
        except (redis.RedisError, OSError, TimeoutError) as exc:
            log.info("storage server %s cannot walk the chain itself (%s): reading headers "
                     "one by one", server.address, exc)
            self.scripting = False
            return None
        if not isinstance(reply, list) or not all(isinstance(x, bytes) for x in reply):
            self.scripting = False
            return None
        return reply

    async def close(self) -> None:
        """Close the connection `header_run` opened, if any."""
        client, self._script_client = self._script_client, None
        if client is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                await client.aclose()

    async def fetch(self, key: bytes, all_pieces: bool = False,
                    known: dict[int, bytes] | None = None) -> Fetched:
        """The record under ``key``, rebuilt from parity when needed, hash-checked.

        The k data pieces are fetched first (except the ``known`` ones), the parity pieces
        only when a data piece is missing or the record does not hash to ``key``. With
        ``all_pieces`` every piece is fetched and compared with the pieces re-encoded from
        the record, so damaged parity is noticed too (for ``verify``).
        """
        coder = self.coder
        k, n = coder.k, coder.n
        if not all_pieces:
            data = await self.pieces(key, range(k), known)
            if all(p is not None for p in data):
                # (a large record is joined and hashed in a thread: an event loop that
                # reads a 16 MB one goes on meanwhile)
                joined = await off_loop(_joined, coder, data, key, self.matches,
                                        size=sum(len(p) for p in data if p is not None))
                if joined is not None:
                    return Fetched(joined, [])
            pieces = data + await self.pieces(key, range(k, n))
        else:
            pieces = await self.pieces(key, range(n), known)
        missing = [i for i, p in enumerate(pieces) if p is None]
        if len(missing) == n:
            if self.down:
                raise DecodeError(f"aggregation {key.hex()}: no piece of it could be read "
                                  f"(servers down: {sorted(self.down)})", key)
            raise DecodeError(f"aggregation {key.hex()} is not stored on any server", key)
        try:
            record, corrupt = await off_loop(
                _rebuilt, coder, pieces, key, self.matches,
                size=k * max(len(p) for p in pieces if p is not None))
        except ErasureError as exc:
            kind = (TooFewPieces if n - len(missing) < k and not self.down.intersection(missing)
                    else DecodeError)
            raise kind(f"aggregation {key.hex()}: cannot rebuild a record that hashes "
                       f"to its key: {exc} (missing pieces: {missing})", key) from None
        return Fetched(record, missing, corrupt, parity_read=True)


def _joined(coder: ErasureCoder, data: list[bytes | None], key: bytes,
            matches: KeyCheck) -> bytes | None:
    """The record of the k data pieces ``data``; None unless it is stored under ``key``."""
    try:
        record = coder.decode(data + [None] * coder.m)
    except ErasureError:
        return None
    return record if matches(record, key) else None


def _rebuilt(coder: ErasureCoder, pieces: list[bytes | None], key: bytes,
             matches: KeyCheck) -> tuple[bytes, list[int]]:
    """The record stored under ``key``, rebuilt from any k of ``pieces``, and the
    damaged pieces: those that differ from a fresh encoding of it. ErasureError if none."""
    record = coder.decode_verified(pieces, lambda found: matches(found, key))
    expected = coder.encode(record)
    return record, [i for i, p in enumerate(pieces) if p is not None and p != expected[i]]


async def fetch_record(pool: StoragePool, key: bytes, coder: ErasureCoder | None = None,
                       matches: KeyCheck = record_key_matches) -> Fetched:
    """The record stored under ``key``, checked against its hash (up to m pieces rebuilt)."""
    reader = PieceReader(pool, coder or ErasureCoder(pool.k, pool.m), matches=matches)
    return await reader.fetch(key)
