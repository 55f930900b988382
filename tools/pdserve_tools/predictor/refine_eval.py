"""Scores estimates of a running request's remaining output against labelled lengths. Pure.

A case is one sample L of one prompt and one g of `GRID` with L > g: a request predicted as its prompt was, still
running after g tokens. Its truth is L - g; an estimator maps (prediction, g, max_tokens) to the p50 and p90 of
what is left. `score_remaining` reports, over all cases, the mean pinball loss of both quantiles (the proper score
of a quantile), the share of cases at or below the p90, and the share within +-100 tokens of the p50; and the
same per g. `EmpiricalRemaining` is a reference estimator that needs the training labels at hand: the empirical
quantiles of L - g over the training samples with L > g whose prompts' predicted p50 fell in the same quartile.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdserve_tools.predictor.labels import LabelRecord
from pdserve_tools.predictor.metrics import pinball
from pdserve_tools.stats import percentile
from router.predictor.prediction import LengthPrediction

GRID = (1, 32, 64, 128, 256, 384)
Estimator = Callable[[LengthPrediction, int, int], LengthPrediction]


@dataclass(frozen=True, slots=True)
class RemainingScores:
    pinball_p50: float
    pinball_p90: float
    p90_coverage: float
    within_100: float
    cases: int


def _scores(cases: Sequence[tuple[int, LengthPrediction]]) -> RemainingScores:
    n = len(cases)
    if n == 0:
        return RemainingScores(0.0, 0.0, 1.0, 1.0, 0)
    return RemainingScores(
        pinball_p50=sum(pinball(t, e.p50, 0.5) for t, e in cases) / n,
        pinball_p90=sum(pinball(t, e.p90, 0.9) for t, e in cases) / n,
        p90_coverage=sum(t <= e.p90 for t, e in cases) / n,
        within_100=sum(abs(t - e.p50) <= 100 for t, e in cases) / n,
        cases=n,
    )


def score_remaining(estimate: Estimator, predictions: Sequence[LengthPrediction], records: Sequence[LabelRecord],
                    grid: Sequence[int] = GRID) -> tuple[RemainingScores, dict[int, RemainingScores]]:
    """Scores over every case, and per g of the grid."""
    if len(predictions) != len(records):
        raise ValueError("score_remaining needs one prediction per record")
    per_g: dict[int, list[tuple[int, LengthPrediction]]] = {g: [] for g in grid}
    for prediction, record in zip(predictions, records, strict=True):
        cap = record.settings.max_tokens
        for g in grid:
            for n in record.lengths:
                if n > g:
                    per_g[g].append((n - g, estimate(prediction, g, cap)))
    return _scores([c for cs in per_g.values() for c in cs]), {g: _scores(cs) for g, cs in per_g.items()}


class EmpiricalRemaining:
    """Reference: the training samples' own conditional quantiles, per quartile of the predicted p50."""

    def __init__(self, predictions: Sequence[LengthPrediction], records: Sequence[LabelRecord]) -> None:
        if not records or len(predictions) != len(records):
            raise ValueError("EmpiricalRemaining needs one prediction per record, and some records")
        p50s = sorted(p.p50 for p in predictions)
        self._edges = [percentile(p50s, q) for q in (25, 50, 75)]
        self._lengths: list[list[int]] = [[] for _ in range(len(self._edges) + 1)]
        for prediction, record in zip(predictions, records, strict=True):
            self._lengths[self._bucket(prediction)].extend(record.lengths)
        for lengths in self._lengths:
            lengths.sort()

    def _bucket(self, prediction: LengthPrediction) -> int:
        return bisect.bisect_right(self._edges, prediction.p50)

    def __call__(self, prediction: LengthPrediction, generated: int, max_tokens: int) -> LengthPrediction:
        lengths = self._lengths[self._bucket(prediction)]
        rest = [n - generated for n in lengths[bisect.bisect_right(lengths, generated):]]
        left = max(max_tokens - generated, 0)
        if not rest:
            return LengthPrediction(min(1, left), min(1, left))
        p50, p90 = (min(max(round(percentile(rest, q)), 1), left) for q in (50, 90))
        return LengthPrediction(p50, max(p50, p90))
