"""`LoopLag`: how late the running event loop wakes a timer, sampled every `period_s`.

A loop that is late by L seconds delays every stream it serves by up to L (a token, a health probe, an accept);
sustained lag means something runs on the loop that should not (tokenizing, JSON of a large body) or the process
is starved of CPU. Each sample is `observe`d (the router's `pdserve_event_loop_lag_seconds`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable


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
