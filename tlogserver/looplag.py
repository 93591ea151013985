"""A probe of the event loop's lateness: a timer that measures how late it fires.

Everything a tlogserver does runs on one event loop, so CPU work that holds it (sealing a
large aggregation, a compaction's checkpoint parts) delays every other connection's reads
and answers by as much. The probe sleeps ``interval`` seconds in a loop and records by how
much each wake-up came late: a stall that spans a wake-up shows as that much lateness. At
the server's default of one wake-up per 100 ms it costs nothing measurable and catches a
stall of d seconds with a chance of about d / (d + 0.1); `benchmarks/loop_stall.py` runs
it every millisecond to catch all of them.
"""

from __future__ import annotations

import asyncio
import time

from .stats import Histogram
from .tasks import cancel_and_wait

#: Seconds between the daemon's wake-ups.
PROBE_INTERVAL = 0.1


class LoopLagProbe:
    """Wakes every ``interval`` seconds and adds how late it woke to ``histogram`` (and to
    ``samples``, when given: a benchmark wants every value)."""

    def __init__(self, histogram: Histogram, interval: float = PROBE_INTERVAL,
                 samples: list[float] | None = None) -> None:
        self.histogram = histogram
        self.interval = interval
        self.samples = samples
        #: The largest lateness seen so far, seconds.
        self.max = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop lag probe")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        interval = self.interval
        clock = time.perf_counter  # (uvloop's loop.time() has a millisecond's resolution)
        while True:
            expected = clock() + interval
            await asyncio.sleep(interval)
            lag = max(0.0, clock() - expected)
            self.histogram.observe(lag)
            if lag > self.max:
                self.max = lag
            if self.samples is not None:
                self.samples.append(lag)
