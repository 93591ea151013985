"""Shared fixtures: real redis-server processes on free loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .redis_fixture import RedisFactory, RedisProcess, redis_server_path
from .serverproc import ServerProcess

__all__ = ["RedisProcess"]


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[RedisFactory]:
    """``redis_factory(n=1, **extra_args) -> list[RedisProcess]``; all killed at teardown.

    ``extra_args`` become redis-server options: ``maxmemory="10mb"`` -> ``--maxmemory 10mb``.
    """
    if redis_server_path() is None:
        pytest.skip("redis-server is not on PATH (make redis installs it)")
    factory = RedisFactory(tmp_path / "redis")
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def redis6(redis_factory: RedisFactory) -> list[RedisProcess]:
    """Six fresh servers: a k=4, m=2 storage pool."""
    return redis_factory(6)


@pytest.fixture
def mem_server() -> Iterator[ServerProcess]:
    """A tlogserver subprocess on the embedded in-memory storage."""
    server = ServerProcess("--memory-storage").start()
    try:
        yield server
    finally:
        server.kill()
