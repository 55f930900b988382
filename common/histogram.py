"""`Tally`: samples kept as a cumulative histogram over fixed upper bounds; `Histogram`: its state at a moment, as
plain data that can travel (a worker's, in its `EngineStats`) and that the router exports as a Prometheus
histogram without knowing the bounds beforehand.

`observe` is O(buckets) with plain ints and floats: it runs once per engine step and every loop-lag sample.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Histogram:
    """Samples so far, as Prometheus keeps a histogram: per upper bound in `bounds`, how many were at most that
    (cumulative, `le`); then all of them (the +Inf bucket) and their sum."""

    bounds: tuple[float, ...]
    le: tuple[int, ...]
    count: int
    total: float

    def buckets(self) -> list[tuple[str, float]]:
        """`(upper bound, cumulative count)` pairs as Prometheus writes them, +Inf last."""
        return [*((str(b), float(n)) for b, n in zip(self.bounds, self.le, strict=True)), ("+Inf", float(self.count))]


class Tally:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"histogram bounds must be strictly increasing, got {bounds}")
        self._bounds = bounds
        self._counts = [0] * len(bounds)
        self._count = 0
        self._total = 0.0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self._bounds, value)  # the first bound >= value
        if i < len(self._counts):
            self._counts[i] += 1
        self._count += 1
        self._total += value

    def histogram(self) -> Histogram:
        cumulative, running = [], 0
        for n in self._counts:
            running += n
            cumulative.append(running)
        return Histogram(self._bounds, tuple(cumulative), self._count, self._total)
