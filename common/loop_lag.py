"""`LoopLag`: how late the running event loop wakes a timer, sampled every `period_s`; `LAG_BUCKETS`: the bounds
its samples are kept in (a `common.histogram.Tally`, a worker's travelling in its `EngineStats`).

A loop that is late by L seconds delays every stream it serves by up to L (a token, a health probe, an accept);
sustained lag means something runs on the loop that should not (tokenizing, JSON of a large body) or the process
is starved of CPU. Each sample is `observe`d: the router's into `pdserve_event_loop_lag_seconds`, each worker
actor's into a `Tally(LAG_BUCKETS)` that the router exports as `pdserve_worker_event_loop_lag_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)  # seconds


class LoopLag:
    def __init__(self, observe: Callable[[float], None], period_s: float = 0.1) -> None:
        self._observe = observe
        self._period_s = period_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts sampling on the running loop."""
        self._task = asyncio.create_task(self._sample(), name="pdserve-loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _sample(self) -> None:
        while True:
            asked = time.monotonic()
            await asyncio.sleep(self._period_s)  # the measurement itself: how much later than asked it returns
            self._observe(max(0.0, time.monotonic() - asked - self._period_s))
