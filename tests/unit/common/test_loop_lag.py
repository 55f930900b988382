"""`LoopLag` sees a loop that something blocks: a sample covering a 0.3 s block is at least that late."""

from __future__ import annotations

import asyncio
import time

from common.loop_lag import LagTally, LoopLag


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


def test_the_tally_keeps_samples_as_a_cumulative_histogram() -> None:
    tally = LagTally()
    for seconds in (0.0005, 0.003, 0.003, 0.2, 7.0):
        tally.observe(seconds)
    h = tally.histogram()
    assert (h.count, round(h.sum_s, 4)) == (5, 7.2065)
    # bounds 1 ms, 2.5 ms, 5 ms, ... 0.25 s, ... 5 s; the 7 s sample is above them all (+Inf only)
    assert h.le[0] == 1 and h.le[1] == 1 and h.le[2] == 3 and h.le[7] == 4 and h.le[-1] == 4
