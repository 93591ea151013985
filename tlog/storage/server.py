"""One storage server of a pool, as tlog sees it: the commands it needs (store pieces and
push the last hash, read pieces, lists, leases) and the errors they raise. Two
implementations: `tlog.storage.redisserver` (a pipelined Redis connection) and
`tlog.storage.memoryserver` (the embedded default storage).

Piece ``i`` of an aggregation is stored on server ``i`` under the aggregation's 32-byte
hash, and every server keeps the list ``last_hash_<vdiskID>`` of the newest hashes (LPUSH,
trimmed to `LAST_HASH_KEEP`), so a reader finds the head of the chain on any server that
survived (the key names: `tlog.storage.keys`)."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence

from .keys import LAST_HASH_KEEP

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


class ScriptMissing(StorageError):
    """EVALSHA found no cached script (the server restarted): store again with EVAL."""


class ScriptRefused(ScriptMissing):
    """The server cannot run the compare-and-set script (no Lua, or an ACL without it):
    `store` goes on without it there, after a warning."""


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


def check_keep(keep: int) -> None:
    """Refuse a last-hash list trimmed to nothing."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
