"""One storage server: the commands tlog needs (store pieces and push the last hash, read
pieces, run the walk script), over a pipelined Redis connection or in memory.

Piece ``i`` of an aggregation is stored on server ``i`` under the aggregation's 32-byte
hash, and every server keeps the list ``last_hash_<vdiskID>`` of the newest hashes (LPUSH,
trimmed to `LAST_HASH_KEEP`), so a reader finds the head of the chain on any server that
survived (the key names: `tlog.storage.keys`)."""

from __future__ import annotations

import abc
import asyncio
import hashlib
import logging
import math
import ssl
import time
from collections.abc import Sequence
from typing import Any

from .address import ServerAddress
from .keys import LAST_HASH_KEEP
from .link import LinkError, ReplyError, RespLink, open_link
from .resp import pack_command_parts

log = logging.getLogger(__name__)

#: A value to store: bytes, or a view of them (the flusher's pieces are views into the
#: erasure coder's output, written out without a copy of their own).
Value = bytes | memoryview


class StorageError(Exception):
    """A storage server could not be reached or refused a command; names the server."""


class HeadMoved(StorageError):
    """A compare-and-set `StorageServer.store` found another head on top of the last-hash
    list than the one expected (``head``; b"" for no list): nothing was written."""

    def __init__(self, message: str, head: bytes) -> None:
        super().__init__(message)
        self.head = head


#: The compare-and-set of the head, atomic on the server: when the list's head (LINDEX 0,
#: '' for none) is ARGV[1], MSET the ARGV[3] (key, value) pairs, LPUSH the rest, LTRIM to
#: ARGV[2]. tlogserver sends no pairs (ARGV[3] = 0): the pieces go in a plain MSET just
#: before it in the same request, which costs the server half as much CPU as copying them
#: through Lua's arguments.
_CAS_SCRIPT = b"""
local head = redis.call('LINDEX', KEYS[1], 0) or ''
if head ~= ARGV[1] then return {'moved', head} end
local n = tonumber(ARGV[3])
if n > 0 then redis.call('MSET', unpack(ARGV, 4, 3 + 2 * n)) end
if #ARGV >= 4 + 2 * n then
  redis.call('LPUSH', KEYS[1], unpack(ARGV, 4 + 2 * n, #ARGV))
  redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
end
return 'OK'
"""
_CAS_SHA = hashlib.sha1(_CAS_SCRIPT).hexdigest().encode()


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))




class StorageServer(abc.ABC):
    """One Redis-protocol server of a pool (or the in-memory equivalent)."""

    address: str
    #: Seconds a call may take before it fails (what a caller of `store_soon` waits).
    timeout: float = 10.0

    def store_soon(self, items: Sequence[tuple[bytes, Value]], list_key: bytes,
                   push: Sequence[bytes], expect_head: bytes,
                   keep: int = LAST_HASH_KEEP) -> asyncio.Future[None] | None:
        """`store` with ``expect_head``, started now without a task, when the server can
        (its future: None on success, else the exception); None: call `store`."""
        return None

    def reset(self, reason: str) -> None:  # noqa: B027 - optional, nothing to drop here
        """Drop the connection, failing what is in flight (a `store_soon` that timed out)."""

    @abc.abstractmethod
    async def store(
        self,
        items: Sequence[tuple[bytes, Value]],
        list_key: bytes,
        push: Sequence[bytes],
        keep: int = LAST_HASH_KEEP,
        expect_head: bytes | None = None,
    ) -> None:
        """SET every (key, value), LPUSH ``push`` in order onto ``list_key``, trim to ``keep``.

        ``push[-1]`` ends at the head of the list. One round trip; the commands run in order
        even when some fail (not a transaction); any failure raises :class:`StorageError`.
        With ``expect_head`` (b"": no list) it is a compare-and-set of the list: the push
        and trim happen, at once, only if the list's head is that; otherwise
        :class:`HeadMoved`. The values may be written all the same (a Redis server gets
        them just before the compare-and-set), unreachable from any list.
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
    async def set_many(self, items: Sequence[tuple[bytes, Value]]) -> None:
        """SET every (key, value): for repair tools that rewrite lost pieces."""

    async def delete_many(self, keys: Sequence[bytes]) -> None:
        """DEL every key: for `tlog rekey` and `tlog compact`, which remove records.

        Not abstract, so that servers written for tests need not have it.
        """
        raise StorageError(f"storage server {self.address}: cannot delete keys")

    async def list_push(self, list_key: bytes, value: bytes) -> None:
        """LPUSH ``value`` onto ``list_key`` (checkpoints, pins)."""
        raise StorageError(f"storage server {self.address}: cannot change lists")

    async def list_remove(self, list_key: bytes, value: bytes) -> None:
        """LREM every ``value`` from ``list_key``."""
        raise StorageError(f"storage server {self.address}: cannot change lists")

    async def set_if_absent(self, key: bytes, value: bytes, ttl: float) -> bytes | None:
        """SET ``key`` to ``value`` for ``ttl`` seconds unless it holds a value (a lease, as
        `tlog compact`'s lock): None when set, else the value it holds."""
        raise StorageError(f"storage server {self.address}: cannot hold leases")

    async def expire_if(self, key: bytes, value: bytes, ttl: float) -> bool:
        """Give ``key`` ``ttl`` more seconds if it still holds ``value``; whether it did."""
        raise StorageError(f"storage server {self.address}: cannot hold leases")

    async def delete_if(self, key: bytes, value: bytes) -> None:
        """DEL ``key`` if it holds ``value`` (a lease given back)."""
        raise StorageError(f"storage server {self.address}: cannot hold leases")

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
    items: Sequence[tuple[bytes, Value]], list_key: bytes, push: Sequence[bytes], keep: int
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


def _mset(items: Sequence[tuple[bytes, Value]]) -> tuple[Any, ...]:
    args: list[Any] = [b"MSET"]
    for key, value in items:
        args.append(key)
        args.append(value)
    return tuple(args)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    text = str(exc)
    if isinstance(exc, TimeoutError) and not text:
        return "timed out"
    return text or type(exc).__name__


class ScriptMissing(StorageError):
    """EVALSHA found no cached script (the server restarted): store again with EVAL."""


class ScriptRefused(ScriptMissing):
    """The server cannot run the compare-and-set script (no Lua, or an ACL without it):
    `store` goes on without it there, after a warning."""


class RedisStorageServer(StorageServer):
    """A Redis/ARDB server reached through one pipelined connection (`tlog.storage.link`).

    Every call is written on the same connection in call order, and the replies come back
    in that same order. So calls issued in order execute in order (a flush's SET lands
    before the next flush's LPUSH), many calls can be in flight at once (no round trip per
    call when many vdisks flush together), and a caller that is cancelled or times out
    never leaves unread replies behind for the next one (its reply is read and dropped).

    The connection is opened lazily and again after a failure: a call fails with
    :class:`StorageError` while the server is down and works again once it is back.
    """

    def __init__(self, address: ServerAddress, *, socket_timeout: float = 10.0) -> None:
        self.server_address = address
        self.address = str(address)
        self.timeout = socket_timeout
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link: RespLink | None = None
        self._closed = False
        self._script_cached = False  # EVALSHA works (else EVAL, which caches it)
        self._no_scripts = False  # the server has no Lua (ARDB builds without it)

    def __repr__(self) -> str:
        return f"RedisStorageServer({self.address!r})"

    def _error(self, detail: str) -> StorageError:
        return StorageError(f"storage server {self.address}: {detail}")

    def _live_link(self) -> RespLink | None:
        """The open connection of this event loop, if there is one."""
        link = self._link
        if link is None or link.reason is not None:
            return None
        if self._loop is not asyncio.get_running_loop():
            return None
        return link

    async def _connect(self) -> RespLink:
        """The open connection, or a new one (one caller connects, the others wait)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # First use, or used again from a new event loop (tests): the old link, if any,
            # belongs to a loop that is gone.
            self._loop, self._lock, self._link = loop, asyncio.Lock(), None
        async with self._lock:
            link = self._live_link()
            if link is not None:
                return link
            try:
                link = await open_link(self.server_address)
            except (OSError, ssl.SSLError, LinkError) as exc:
                raise self._error(f"cannot connect: {_reason(exc)}") from exc
            self._link = link
            return link

    def reset(self, reason: str) -> None:
        """Drop the connection (a request on it got no answer in time): what is in flight
        fails; the next call connects again."""
        link, self._link = self._link, None
        if link is not None:
            link.close(reason)

    async def _execute(self, commands: Sequence[tuple[Any, ...]],
                       check: bool = True) -> list[Any]:
        """Send ``commands`` in one write and return their replies; errors -> StorageError
        (error replies too, unless ``check`` is False: they are then in the list).

        One timeout bounds the whole call (connecting, sending, waiting for the replies): a
        server that stops answering costs at most that long.
        """
        if self._closed:
            raise self._error("closed")
        data = pack_command_parts(commands)
        link: RespLink | None = None
        try:
            async with asyncio.timeout(self.timeout):
                link = self._live_link() or await self._connect()
                replies = await link.submit(data, len(commands))
        except TimeoutError:
            detail = f"no reply within {self.timeout:g} s"
            if link is not None and link is self._link:
                self.reset(detail)
            raise self._error(detail) from None
        except LinkError as exc:
            raise self._error(str(exc)) from None
        for reply in replies if check else ():
            if isinstance(reply, ReplyError):
                raise self._error(f"command failed: {reply}")
        return replies

    def store_soon(self, items: Sequence[tuple[bytes, Value]], list_key: bytes,
                   push: Sequence[bytes], expect_head: bytes,
                   keep: int = LAST_HASH_KEEP) -> asyncio.Future[None] | None:
        """The fast path of `store` with a compare-and-set: written now on the open
        connection, the future of its outcome returned (StorageError, HeadMoved or
        ScriptMissing). None when it cannot be taken (no open connection, the script not
        known to be cached, no scripts): call `store`. No timeout: the caller bounds the
        wait and calls `reset` when it runs out."""
        link = self._live_link()
        if link is None or self._closed or not self._script_cached or self._no_scripts:
            return None
        commands = self._cas_commands(items, list_key, push, keep, expect_head)
        sent = link.submit(pack_command_parts(commands), len(commands))
        outcome: asyncio.Future[None] = sent.get_loop().create_future()
        sent.add_done_callback(lambda done: self._stored(done, outcome))
        return outcome

    def _stored(self, sent: asyncio.Future[list[Any]], outcome: asyncio.Future[None]) -> None:
        if outcome.done():
            return
        exc = sent.exception()
        if exc is not None:
            outcome.set_exception(self._error(str(exc)))
            return
        try:
            self._cas_outcome(sent.result())
        except StorageError as failed:
            outcome.set_exception(failed)
        else:
            outcome.set_result(None)

    def _cas_outcome(self, replies: list[Any]) -> None:
        """Raise what the replies of `_cas_commands` mean, if anything but success: a
        StorageError, HeadMoved (another head is on top), ScriptMissing (store again with
        EVAL) or ScriptRefused (no scripts here)."""
        *pieces, reply = replies
        failed = next((r for r in pieces if isinstance(r, ReplyError)), None)
        if failed is not None:
            raise self._error(f"command failed: {failed}")
        if isinstance(reply, ReplyError):
            text = str(reply)
            if "NOSCRIPT" in text or "No matching script" in text:
                self._script_cached = False  # the server restarted: send it again
                raise ScriptMissing(f"storage server {self.address}: the script is not cached")
            if "unknown command" in text.lower() or "NOPERM" in text:
                self._script_cached = False  # the next try goes by `store`, which falls back
                raise ScriptRefused(f"storage server {self.address}: {text}")
            raise self._error(f"command failed: {reply}")
        self._script_cached = True
        if isinstance(reply, list) and reply and reply[0] == b"moved":
            head = bytes(reply[1])
            raise HeadMoved(f"storage server {self.address}: the chain head moved to "
                            f"{head.hex()[:16] or 'nothing'} (another writer?)", head)

    async def store(
        self,
        items: Sequence[tuple[bytes, Value]],
        list_key: bytes,
        push: Sequence[bytes],
        keep: int = LAST_HASH_KEEP,
        expect_head: bytes | None = None,
    ) -> None:
        _check_keep(keep)
        if expect_head is not None and not self._no_scripts:
            await self._store_if(items, list_key, push, keep, expect_head)
            return
        commands = _store_commands(items, list_key, push, keep)
        if commands:
            await self._execute(commands)

    def _cas_commands(self, items: Sequence[tuple[bytes, Value]], list_key: bytes,
                      push: Sequence[bytes], keep: int,
                      expect_head: bytes) -> list[tuple[Any, ...]]:
        """The pieces (a plain SET/MSET), then the head's compare-and-set script. A refused
        round leaves its pieces behind. They are not deleted: the same records may be on
        the chain already (an earlier try of the round that reached some servers, which
        another writer continued from); otherwise no list and no prev names them."""
        commands = _store_commands(items, list_key, (), keep)
        args = (1, list_key, expect_head, keep, 0, *push)
        commands.append((b"EVALSHA", _CAS_SHA, *args) if self._script_cached
                        else (b"EVAL", _CAS_SCRIPT, *args))
        return commands

    async def _store_if(self, items: Sequence[tuple[bytes, Value]], list_key: bytes,
                        push: Sequence[bytes], keep: int, expect_head: bytes) -> None:
        for _ in range(2):
            commands = self._cas_commands(items, list_key, push, keep, expect_head)
            try:
                self._cas_outcome(await self._execute(commands, check=False))
            except ScriptRefused as exc:
                # No Lua, or an ACL without +eval/+evalsha/+lindex: store as before,
                # loudly, rather than fail every round on this server.
                self._no_scripts = True
                log.warning("storage server %s cannot run the head's compare-and-set "
                            "script (%s): the chain head is moved without it there "
                            "(ACL users need +eval +evalsha +lindex)", self.address, exc)
                await self.store(items, list_key, push, keep)
                return
            except ScriptMissing:
                continue  # sent again, with EVAL
            return

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

    async def set_many(self, items: Sequence[tuple[bytes, Value]]) -> None:
        if items:
            await self._execute([_mset(items)])

    async def delete_many(self, keys: Sequence[bytes]) -> None:
        if keys:
            await self._execute([(b"DEL", *keys)])

    async def list_push(self, list_key: bytes, value: bytes) -> None:
        await self._execute([(b"LPUSH", list_key, value)])

    async def list_remove(self, list_key: bytes, value: bytes) -> None:
        await self._execute([(b"LREM", list_key, 0, value)])

    async def set_if_absent(self, key: bytes, value: bytes, ttl: float) -> bytes | None:
        done, held = await self._execute([(b"SET", key, value, b"NX", b"PX", _ms(ttl)),
                                          (b"GET", key)])
        return None if done is not None else held

    async def expire_if(self, key: bytes, value: bytes, ttl: float) -> bool:
        # GET, then PEXPIRE: not atomic, but only the holder renews and a lease that lapsed
        # is found out here the next time.
        if await self.get(key) != value:
            return False
        return bool((await self._execute([(b"PEXPIRE", key, _ms(ttl))]))[0])

    async def delete_if(self, key: bytes, value: bytes) -> None:
        if await self.get(key) == value:
            await self._execute([(b"DEL", key)])

    async def ping(self) -> None:
        await self._execute([(b"PING",)])

    async def execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Raw commands in one round trip, their replies in order (for stores that need
        more than a pool's calls: the standby block store's MULTI/EXEC and SCAN)."""
        return await self._execute(commands)

    async def close(self) -> None:
        self._closed = True
        self.reset("closed")


class MemoryStorageServer(StorageServer):
    """A storage server inside this process: the embedded default storage.

    Same semantics as Redis for the commands used here, including WRONGTYPE errors when a
    key holds a value of the other kind. Lost when the process exits.
    """

    def __init__(self, address: str = "memory") -> None:
        self.address = address
        self._data: dict[bytes, bytes | list[bytes]] = {}
        # monotonic deadlines of the keys set with a time to live (leases only)
        self._expires: dict[bytes, float] = {}

    def __repr__(self) -> str:
        return f"MemoryStorageServer({self.address!r})"

    def _wrongtype(self, key: bytes) -> StorageError:
        return StorageError(
            f"storage server {self.address}: command failed: WRONGTYPE key {key!r} holds "
            "a value of the wrong kind"
        )

    async def store(
        self,
        items: Sequence[tuple[bytes, Value]],
        list_key: bytes,
        push: Sequence[bytes],
        keep: int = LAST_HASH_KEEP,
        expect_head: bytes | None = None,
    ) -> None:
        _check_keep(keep)
        if expect_head is not None:
            current = self._data.get(bytes(list_key))
            if current is not None and not isinstance(current, list):
                raise self._wrongtype(list_key)
            head = current[0] if current else b""
            if head != expect_head:
                raise HeadMoved(f"storage server {self.address}: the chain head moved to "
                                f"{head.hex()[:16] or 'nothing'} (another writer?)", head)
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

    async def set_many(self, items: Sequence[tuple[bytes, Value]]) -> None:
        for key, value in items:
            self._data[bytes(key)] = bytes(value)

    async def delete_many(self, keys: Sequence[bytes]) -> None:
        for key in keys:
            self._data.pop(bytes(key), None)

    def _list(self, list_key: bytes, create: bool) -> list[bytes]:
        current = self._data.get(bytes(list_key))
        if current is None:
            current = []
            if create:
                self._data[bytes(list_key)] = current
        if not isinstance(current, list):
            raise self._wrongtype(list_key)
        return current

    async def list_push(self, list_key: bytes, value: bytes) -> None:
        self._list(list_key, True).insert(0, bytes(value))

    async def list_remove(self, list_key: bytes, value: bytes) -> None:
        current = self._list(list_key, False)
        current[:] = [v for v in current if v != value]
        if not current:
            self._data.pop(bytes(list_key), None)

    def _lease(self, key: bytes) -> bytes | None:
        value = self._data.get(bytes(key))
        if value is not None and self._expires.get(bytes(key), math.inf) <= time.monotonic():
            self._data.pop(bytes(key), None)
            self._expires.pop(bytes(key), None)
            return None
        if isinstance(value, list):
            raise self._wrongtype(key)
        return value

    async def set_if_absent(self, key: bytes, value: bytes, ttl: float) -> bytes | None:
        held = self._lease(key)
        if held is not None:
            return held
        self._data[bytes(key)] = bytes(value)
        self._expires[bytes(key)] = time.monotonic() + ttl
        return None

    async def expire_if(self, key: bytes, value: bytes, ttl: float) -> bool:
        if self._lease(key) != value:
            return False
        self._expires[bytes(key)] = time.monotonic() + ttl
        return True

    async def delete_if(self, key: bytes, value: bytes) -> None:
        if self._lease(key) == value:
            self._data.pop(bytes(key), None)
            self._expires.pop(bytes(key), None)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
