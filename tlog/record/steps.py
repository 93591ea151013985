"""CPU work on large records in steps, so that an event loop that does it keeps turning.

A job (sealing an aggregation, say) is written once, as a generator that yields each heavy
piece of its work as a `Work` and is sent back the piece's result, or yields None where the
loop may simply run. `run_now` does every piece at once, in order: the job gives the same
bytes however it is run. `run_stepped` lets the event loop run after each piece and hands
the pieces of more than `OFFLOAD_BYTES` to a worker thread: those pieces are single calls
into C that release the GIL (snappy, AES-GCM, BLAKE2b, ISA-L, a join of bytes), so the
loop goes on while they run, and the Python around them stays on the loop, in steps.

Small jobs never leave the loop: a hop to a thread and back costs more than the work
(sealing every aggregation in a thread was measured slower on a 2-core machine).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

#: Bytes a piece of work goes through above which `run_stepped` runs it in a thread: a
#: MiB is about 1.5 ms of BLAKE2b, the slowest of those pieces, on the loop.
OFFLOAD_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Work:
    """One call of a stepped job: ``func(*args)``, going through ``size`` bytes."""

    func: Callable[..., Any]
    args: tuple[Any, ...]
    size: int


#: A stepped job giving a T: yields `Work` (and is sent its result) or None (a pause).
Steps = Generator[Work | None, Any, T]


def run_now(steps: Steps[T]) -> T:
    """Run every step of ``steps`` here and now; its result."""
    result: Any = None
    while True:
        try:
            item = steps.send(result)
        except StopIteration as done:
            value: T = done.value
            return value
        result = None if item is None else item.func(*item.args)


async def run_stepped(steps: Steps[T], offload: int = OFFLOAD_BYTES) -> T:
    """Run ``steps`` letting the event loop run between them; a `Work` of more than
    ``offload`` bytes runs in the loop's default executor (a worker thread)."""
    loop = asyncio.get_running_loop()
    result: Any = None
    while True:
        try:
            item = steps.send(result)
        except StopIteration as done:
            value: T = done.value
            return value
        if item is not None and item.size > offload:
            result = await loop.run_in_executor(None, item.func, *item.args)
            continue
        result = None if item is None else item.func(*item.args)
        await asyncio.sleep(0)


async def off_loop(func: Callable[..., T], *args: Any, size: int,
                   offload: int = OFFLOAD_BYTES) -> T:
    """``func(*args)``: in a worker thread when it goes through more than ``offload``
    bytes (``size``), else here, at once."""
    if size > offload:
        return await asyncio.get_running_loop().run_in_executor(None, func, *args)
    return func(*args)
