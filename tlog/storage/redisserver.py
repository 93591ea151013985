"""A storage server reached through one pipelined Redis connection (`tlog.storage.link`):
pieces in SET/MSET, the last-hash list moved by a compare-and-set script."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
from collections.abc import Sequence
from typing import Any

from .address import ServerAddress
from .keys import LAST_HASH_KEEP
from .link import LinkError, ReplyError, RespLink, open_link
from .resp import pack_command_parts
from .server import (
    HeadMoved,
    ScriptMissing,
    ScriptRefused,
    StorageError,
    StorageServer,
    Value,
    check_keep,
)

log = logging.getLogger(__name__)

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
        check_keep(keep)
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
