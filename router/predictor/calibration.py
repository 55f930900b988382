"""Online calibration of the predicted p90 from finished requests. Pure.

Contract. `P90Calibrator.apply` scales a raw p90 (tokens) by the current factor; `observe` takes the p90 that was
issued for a finished request and the number of tokens it really generated. The factor follows adaptive conformal
inference: in log space it moves up by `step * target` after a miss (observed > issued p90) and down by
`step * (1 - target)` after a hit, so it stands still exactly when the miss rate is 1 - target; the long-run
coverage converges to `target` whatever the head's bias, and keeps following a drifting workload. The factor is
clamped to [1/max_factor, max_factor] so a burst of odd requests cannot run it away. `coverage` is the share
of the last `window` finished requests whose issued p90 covered them (what the metrics report).
"""

from __future__ import annotations

import math
from collections import deque


class P90Calibrator:
    __slots__ = ("_covered", "_hits", "_log_factor", "max_factor", "observations", "step", "target")

    def __init__(self, target: float = 0.9, step: float = 0.05, window: int = 1000, max_factor: float = 8.0) -> None:
        if not 0 < target < 1 or not step > 0 or window < 1 or not max_factor >= 1:
            raise ValueError("a p90 calibrator needs 0 < target < 1, step > 0, window >= 1 and max_factor >= 1")
        self.target = target
        self.step = step
        self.max_factor = max_factor
        self.observations = 0
        self._log_factor = 0.0
        self._covered: deque[bool] = deque(maxlen=window)
        self._hits = 0

    @property
    def factor(self) -> float:
        return math.exp(self._log_factor)

    @property
    def coverage(self) -> float:
        """Share of the last `window` requests at or below their issued p90 (NaN before the first)."""
        return self._hits / len(self._covered) if self._covered else math.nan

    def apply(self, raw_p90: float) -> float:
        return raw_p90 * self.factor

    def observe(self, issued_p90: int, observed: int) -> None:
        covered = observed <= issued_p90
        if len(self._covered) == self._covered.maxlen:
            self._hits -= self._covered[0]
        self._covered.append(covered)
        self._hits += covered
        self.observations += 1
        # Hit: -step * (1 - target); miss: +step * target. Zero drift at a miss rate of 1 - target.
        drift = self.step * (self.target - covered)
        limit = math.log(self.max_factor)
        self._log_factor = min(max(self._log_factor + drift, -limit), limit)
