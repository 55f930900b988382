"""`LoopLag` sees a loop that something blocks: a sample covering a 0.3 s block is at least that late."""

from __future__ import annotations

import asyncio
import time

from common.loop_lag import LoopLag


def test_a_blocked_loop_shows_as_lag() -> None:
    samples: list[float] = []

    async def main() -> None:
        lag = LoopLag(samples.append, period_s=0.01)
        lag.start()
        while not samples:  # the monitor has taken a sample of the idle loop
            await asyncio.sleep(0)
        time.sleep(0.3)  # blocks the loop: what the monitor must see, not a wait for anything
        taken = len(samples)
        while len(samples) == taken:
            await asyncio.sleep(0)
        await lag.stop()

    asyncio.run(main())
    assert max(samples) >= 0.28
    assert min(samples) < 0.28  # an unblocked sample is not

