"""Goodput under SLO: the highest request rate at which a run still meets its SLO target. Pure search.

`highest_passing(passes, start)` assumes `passes(rate)` is monotone (true up to some rate, false beyond). It
doubles from `start` until a rate fails (or halves until one passes), then bisects between the last rate
that passed and the first that failed, `bisect_steps` times. It returns the highest rate seen to pass (0.0
when none did), so the answer lies within `(hi - lo) / 2**bisect_steps` below the true threshold.
"""

from __future__ import annotations

from collections.abc import Callable


def highest_passing(passes: Callable[[float], bool], start: float, bisect_steps: int = 4,
                    max_doublings: int = 8) -> float:
    if start <= 0 or bisect_steps < 0 or max_doublings < 0:
        raise ValueError("the search needs start > 0, bisect_steps >= 0 and max_doublings >= 0")
    lo, hi = 0.0, start
    if passes(start):
        lo, hi = start, 2 * start
        for _ in range(max_doublings):
            if not passes(hi):
                break
            lo, hi = hi, 2 * hi
        else:
            return lo  # still passing at the last doubling: report it, the search is capped
    else:
        for _ in range(max_doublings):
            rate = hi / 2
            if passes(rate):
                lo = rate
                break
            hi = rate
        else:
            return 0.0
    for _ in range(bisect_steps):
        mid = (lo + hi) / 2
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return lo
