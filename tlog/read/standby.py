"""The standby block store that slave sync keeps in step with a vdisk's log.

Its blocks are laid out as the player's Redis block store (`RedisBlockStorage`):
``<prefix><index>`` holds a block, no key means zeroes, so ``tlog nbd --backend redis`` can
serve it. One more key, ``<prefix>tlog:slave-sync`` (never a decimal index), records the
aggregation applied last (`SyncPosition`, JSON). Each `StandbyStore.apply` writes blocks
and position in one Lua script, atomic and conditional on the position not having moved:
a standby is always exactly the log replayed up to the aggregation its position names,
whatever crashed when, and two writers cannot interleave.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from tlog.protocol.ranges import RangeError, range_count
from tlog.protocol.status import Operation
from tlog.protocol.wire import Block
from tlog.record.aggregation import ZERO_HASH
from tlog.storage import RedisStorageServer, ServerAddress
from tlog.storage.address import StorageConfigError
from tlog.storage.blockstore import (
    RANGE_KEYS_MAX,
    block_index,
    block_key,
    default_prefix,
    keys_in_range,
    scan_pattern,
)
from tlog.storage.keys import nbd_state_key, standby_position_key

#: Keys deleted per DEL while clearing a standby.
_CLEAR_BATCH = 1000
#: Blocks and position at once, if the position is still ARGV[1] ('' for none): MSET the
#: ARGV[3] (key, value) pairs after it, DEL the rest, SET the position to ARGV[2]. In chunks:
#: Lua's unpack takes a few thousand values at most, and a range names up to 65,536 keys.
_APPLY_SCRIPT = b"""
local cur = redis.call('GET', KEYS[1]) or ''
if cur ~= ARGV[1] then return {'moved', cur} end
local n = tonumber(ARGV[3])
local last = 3 + 2 * n
for i = 4, last, 1000 do redis.call('MSET', unpack(ARGV, i, math.min(i + 999, last))) end
for i = last + 1, #ARGV, 1000 do redis.call('DEL', unpack(ARGV, i, math.min(i + 999, #ARGV))) end
redis.call('SET', KEYS[1], ARGV[2])
return 'OK'
"""
#: DEL the keys after ARGV[1] if the position is still ARGV[1] (a large range's blocks,
#: deleted before the group's `_APPLY_SCRIPT`).
_DELETE_SCRIPT = b"""
local cur = redis.call('GET', KEYS[1]) or ''
if cur ~= ARGV[1] then return {'moved', cur} end
for i = 2, #ARGV, 1000 do redis.call('DEL', unpack(ARGV, i, math.min(i + 999, #ARGV))) end
return 'OK'
"""


class StandbyError(Exception):
    """The standby cannot be used (unreachable, or holds something else); names it."""


@dataclass(frozen=True)
class StandbyTarget:
    """Where one vdisk's standby lives: a Redis server and the key prefix of its blocks."""

    address: ServerAddress
    prefix: str

    def describe(self) -> str:
        return f"redis {self.address} (keys {self.prefix}<index>)"


def parse_slave_targets(vdisks: Mapping[Any, Any] | None) -> dict[str, StandbyTarget]:
    """The standby of every vdisk entry with ``slave_sync: true`` (``slave_server``
    host:port[@db] or redis:// URL, optional ``slave_prefix``); errors name the key."""
    targets: dict[str, StandbyTarget] = {}
    for key, entry in (vdisks or {}).items():
        if not isinstance(entry, Mapping):
            continue
        vdisk_id = str(key)
        path = f"vdisks.{vdisk_id}"
        enabled = entry.get("slave_sync", False)
        if not isinstance(enabled, bool):
            raise StorageConfigError(f"{path}.slave_sync: expected true or false, "
                                     f"got {enabled!r}")
        server = entry.get("slave_server")
        prefix = entry.get("slave_prefix", default_prefix(vdisk_id))
        if not isinstance(prefix, str) or not prefix:
            raise StorageConfigError(f"{path}.slave_prefix: expected a non-empty string")
        if not enabled:
            continue
        if server is None:
            raise StorageConfigError(f"{path}.slave_server: missing (slave_sync is on: the "
                                     "standby's redis host:port[@db])")
        if not isinstance(server, str):
            raise StorageConfigError(f"{path}.slave_server: expected host:port[@db]")
        try:
            address = ServerAddress.parse(server)
        except StorageConfigError as exc:
            raise StorageConfigError(f"{path}.slave_server: {exc}") from None
        targets[vdisk_id] = StandbyTarget(address, prefix)
    return targets


@dataclass(frozen=True)
class SyncPosition:
    """What a standby holds: the log replayed up to aggregation ``hash`` (the zero hash:
    nothing yet), whose epoch is ``epoch`` and in which ``sequence`` is the highest
    sequence applied (-1: none)."""

    hash: bytes = ZERO_HASH
    epoch: int = 0
    sequence: int = -1
    #: The newest block timestamp applied (ns since the epoch, 0: none), and when the
    #: position was recorded.
    timestamp: int = 0
    applied_at: int = 0
    vdisk: str = ""
    #: Why slave sync of this standby ended (WaitNbdSlaveSync: it is the primary now);
    #: "" while it runs.
    ended: str = ""

    def to_bytes(self) -> bytes:
        data = asdict(self)
        data["hash"] = self.hash.hex()
        data["version"] = 1
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> SyncPosition:
        try:
            data = json.loads(raw)
            if data.pop("version") != 1:
                raise ValueError("unknown version")
            data["hash"] = bytes.fromhex(data["hash"])
            if len(data["hash"]) != len(ZERO_HASH):
                raise ValueError("hash size")
            return cls(**data)
        except (ValueError, TypeError, KeyError) as exc:
            raise StandbyError(f"unreadable slave sync position {raw[:80]!r}: {exc}") from None

    def after(self, blocks: Iterable[Block], hash: bytes, epoch: int) -> SyncPosition:
        """The position once ``blocks`` of aggregation ``hash`` (of ``epoch``) are applied."""
        sequence = self.sequence if epoch == self.epoch else -1
        timestamp = self.timestamp
        for b in blocks:
            if b.sequence > sequence:
                sequence = b.sequence
            if b.timestamp > timestamp:
                timestamp = b.timestamp
        return replace(self, hash=hash, epoch=epoch, sequence=sequence, timestamp=timestamp,
                       applied_at=time.time_ns())

    def at_checkpoint(self, covered: bytes, epoch: int, sequence: int,
                      timestamp: int) -> SyncPosition:
        """The position once a checkpoint's parts are applied: the state after the
        aggregation it covers (which the next aggregation names as its prev)."""
        return replace(self, hash=covered, epoch=epoch, sequence=sequence,
                       timestamp=max(self.timestamp, timestamp), applied_at=time.time_ns())

    def describe(self) -> str:
        if self.hash == ZERO_HASH:
            return "nothing applied"
        return (f"aggregation {self.hash.hex()[:16]} (epoch {self.epoch}, sequence "
                f"{self.sequence})")


def new_blocks(blocks: Iterable[Block], epoch: int, position: SyncPosition) -> list[Block]:
    """The blocks of an aggregation of ``epoch`` a standby at ``position`` has not applied:
    within its epoch a sequence is applied once (a later copy is a re-flush of the same
    write), a later epoch is applied whole (the replay rule of `tlog.read.chain`)."""
    if epoch > position.epoch or position.sequence < 0:
        return list(blocks)
    return [b for b in blocks if b.sequence > position.sequence]


class StandbyStore:
    """One vdisk's standby: read its position, apply blocks with a new position atomically,
    clear it. Errors are `StorageError` (unreachable) or `StandbyError` (bad content)."""

    def __init__(self, target: StandbyTarget, block_size: int, timeout: float = 10.0) -> None:
        self.target = target
        self.block_size = block_size
        self.prefix = target.prefix.encode()
        self.state_key = standby_position_key(self.prefix)
        self._server = RedisStorageServer(target.address, socket_timeout=timeout)
        #: The position value as this store last read or wrote it (b"": none; None: not
        #: known), which the next write compares against.
        self._recorded: bytes | None = None

    def describe(self) -> str:
        return self.target.describe()

    def key(self, index: int) -> bytes:
        return block_key(self.prefix, index)

    async def served_state(self) -> bytes | None:
        """The state `tlog nbd` records in the standby once the vdisk failed over to it
        (JSON, `tlog.nbd.intent.ExportState`); None while it is a standby."""
        return await self._server.get(nbd_state_key(self.prefix))

    async def position(self) -> SyncPosition | None:
        """The recorded position; None when the standby was never synced."""
        raw = await self._server.get(self.state_key)
        self._recorded = raw or b""
        return None if raw is None else SyncPosition.from_bytes(raw)

    async def apply(self, blocks: Sequence[Block], position: SyncPosition) -> None:
        """Apply ``blocks`` in order (the last one on an index wins) and record
        ``position``, all or nothing, and only if the standby's position is still the one
        this store last read or wrote: two syncers (two tlogservers of a fleet) cannot
        undo each other's work. `StandbyError` when it moved; read `position` again."""
        final: dict[int, Block] = {}
        ranges: list[tuple[int, int]] = []
        for b in blocks:
            if b.operation == Operation.DELETE_RANGE:
                try:
                    count = range_count(b.index, b.data)
                except RangeError as exc:
                    raise StandbyError(f"sequence {b.sequence}: {exc}") from None
                end = b.index + count
                for index in [i for i in final if b.index <= i < end]:
                    del final[index]  # earlier writes the range undoes
                ranges.append((b.index, count))
            else:
                final[b.index] = b
        sets: list[Any] = []
        deletes: list[Any] = []
        bs = self.block_size
        for index, b in final.items():
            if b.operation == Operation.SET:
                data = b.data
                if len(data) < bs:  # as the player stores it: completed with zeroes
                    data = bytes(data) + bytes(bs - len(data))
                sets += (self.key(index), data)
            else:
                deletes.append(self.key(index))
        # A range's keys, but for the blocks written after it (in ``final``): the script
        # sets, then deletes. A large range: the keys the standby holds, deleted before the
        # script, each batch on the same condition. A crash in between is harmless: the
        # position has not moved, and the group is applied again from it before anyone
        # reads the standby (it is not in step).
        for first, count in ranges:
            if count <= RANGE_KEYS_MAX:
                deletes += [block_key(self.prefix, i) for i in range(first, first + count)
                            if i not in final]
            else:
                await self._delete_stored(first, count, final)
        await self._record_if(position, sets, deletes)

    async def _delete_stored(self, first: int, count: int, keep: Mapping[int, Block]) -> None:
        """Delete the blocks of ``[first, first + count)`` the standby holds, but those of
        ``keep`` (SCAN, then DEL in batches)."""
        cursor: bytes | int = 0
        while True:  # (keys deleted during a SCAN do not disturb it)
            reply = (await self._server.execute(
                [(b"SCAN", cursor, b"MATCH", scan_pattern(self.prefix), b"COUNT",
                  _CLEAR_BATCH)]))[0]
            cursor = reply[0]
            doomed = [k for k in keys_in_range(self.prefix, reply[1], first, count)
                      if block_index(self.prefix, k) not in keep]
            if doomed:
                await self._delete_if(doomed)
            if cursor in (0, b"0"):
                break

    async def _delete_if(self, keys: list[bytes]) -> None:
        if self._recorded is None:
            await self.position()
        assert self._recorded is not None
        reply = (await self._server.execute([
            (b"EVAL", _DELETE_SCRIPT, 1, self.state_key, self._recorded, *keys)]))[0]
        if isinstance(reply, list) and reply and reply[0] == b"moved":
            self._recorded = None
            raise StandbyError(f"standby {self.describe()}: its position moved under us "
                               "(another tlogserver syncing it?)")

    async def record(self, position: SyncPosition) -> None:
        """Record ``position`` alone (e.g. that sync ended), on the same condition."""
        await self._record_if(position, [], [])

    async def _record_if(self, position: SyncPosition, sets: list[Any],
                         deletes: list[Any]) -> None:
        if self._recorded is None:
            await self.position()
        assert self._recorded is not None
        raw = position.to_bytes()
        reply = (await self._server.execute([
            (b"EVAL", _APPLY_SCRIPT, 1, self.state_key, self._recorded, raw, len(sets) // 2,
             *sets, *deletes)]))[0]
        if isinstance(reply, list) and reply and reply[0] == b"moved":
            self._recorded = None
            raise StandbyError(f"standby {self.describe()}: its position moved under us "
                               "(another tlogserver syncing it?)")
        self._recorded = raw

    async def clear(self) -> int:
        """Delete every block key and the position: the standby of an empty log. Returns
        the number of keys deleted. Only keys ``<prefix><decimal>`` are blocks."""
        deleted = 0
        cursor: bytes | int = 0
        pattern = scan_pattern(self.prefix)
        while True:
            reply = (await self._server.execute(
                [(b"SCAN", cursor, b"MATCH", pattern, b"COUNT", _CLEAR_BATCH)]))[0]
            cursor, keys = reply[0], reply[1]
            mine = [k for k in keys if block_index(self.prefix, k) is not None]
            if mine:
                await self._server.execute([(b"DEL", *mine)])
                deleted += len(mine)
            if cursor in (0, b"0"):
                break
        await self._server.execute([(b"DEL", self.state_key)])
        self._recorded = b""
        return deleted

    async def close(self) -> None:
        await self._server.close()
