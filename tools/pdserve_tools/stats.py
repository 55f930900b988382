"""Order statistics over plain lists of floats: the one percentile every tool reports with. Pure.

`percentile(values, q)` interpolates linearly between the closest ranks (Hyndman-Fan type 7, numpy's default,
which vLLM's benchmarks use), q in [0, 100]; the median is `percentile(values, 50)`. An empty list gives NaN.
`median_interval` is a distribution-free confidence interval for that median.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def percentile(values: Iterable[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval for the median: the order statistics x(j) and x(n+1-j) with j the
    largest rank such that a Binomial(n, 1/2) count falls below j with probability at most (1 - level) / 2.
    The whole range when `values` are too few for that level."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2
    below, j = 0.0, 0  # below = P(count < j + 1) as j grows
    while j < n // 2:
        below += math.comb(n, j) / 2**n
        if below > tail:
            break
        j += 1
    return ordered[max(j - 1, 0)], ordered[n - max(j, 1)]
