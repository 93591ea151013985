"""A storage server inside this process: the embedded storage a daemon uses when given no
storage servers, lost when the process exits."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from .keys import LAST_HASH_KEEP
from .server import HeadMoved, StorageError, StorageServer, Value, check_keep


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
        check_keep(keep)
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
