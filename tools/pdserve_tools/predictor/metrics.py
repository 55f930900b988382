"""Pure arithmetic of the output-length predictor: split assignment, pinball loss and evaluation scores.

Contract. `split_of` maps a conversation key to "train", "validation" or "test" by a stable hash (sha256, not
Python's salted `hash`), so a key keeps its split across runs, machines and file orders. `pinball` is the
quantile loss of one prediction. `score` compares per-prompt predictions (p50, p90) with the observed output
lengths of each prompt's samples: Kendall's tau-b between the predicted p50 and each prompt's median length, and,
per sample (every sample is one request the router would see), the mean absolute error of the p50, the share
of samples within +-50 and +-100 tokens of it, and the share at or below the p90 (its coverage).
`split_half_tau` is the labels' own noise: how well half of each prompt's samples ranks the prompts by the
median of the other half. A predictor scored against medians of a few samples can beat it only by as much as
the medians' own noise allows, so it reads as a ceiling on the tau one can show with the file.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve_tools.stats import percentile

SPLITS = ("train", "validation", "test")


def split_of(key: str, validation: float = 0.1, test: float = 0.1) -> str:
    """The split of a conversation: test, then validation, take the lowest hash values; the rest trains."""
    if validation < 0 or test < 0 or validation + test > 1:
        raise ValueError("validation and test shares must be >= 0 and sum to at most 1")
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64  # uniform in [0, 1)
    if u < test:
        return "test"
    if u < test + validation:
        return "validation"
    return "train"


def pinball(target: float, predicted: float, quantile: float) -> float:
    """The quantile (pinball) loss: under-prediction costs `quantile` per unit, over-prediction 1 - quantile."""
    diff = target - predicted
    return max(quantile * diff, (quantile - 1) * diff)


def mean_pinball(targets: Sequence[float], predicted: Sequence[float], quantile: float) -> float:
    if len(targets) != len(predicted) or not targets:
        raise ValueError("mean_pinball needs two non-empty sequences of the same length")
    return sum(pinball(t, p, quantile) for t, p in zip(targets, predicted, strict=True)) / len(targets)


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either sequence corrected for); NaN when either sequence is constant."""
    if len(x) != len(y):
        raise ValueError("kendall_tau_b needs two sequences of the same length")
    concordant = discordant = tied_x = tied_y = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 or dy == 0:
                tied_x += dx == 0
                tied_y += dy == 0
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    pairs = n * (n - 1) // 2
    denominator = math.sqrt((pairs - tied_x) * (pairs - tied_y))
    return (concordant - discordant) / denominator if denominator > 0 else math.nan


@dataclass(frozen=True, slots=True)
class Scores:
    kendall_tau: float
    mae_tokens: float
    within_50: float
    within_100: float
    p90_coverage: float
    prompts: int
    samples: int


def score(p50: Sequence[int], p90: Sequence[int], lengths: Sequence[Sequence[int]]) -> Scores:
    """Scores per-prompt predictions against the observed lengths of every sample of each prompt."""
    if not (len(p50) == len(p90) == len(lengths)) or not lengths or not all(lengths):
        raise ValueError("score needs one p50, one p90 and at least one observed length per prompt")
    medians = [percentile(ls, 50) for ls in lengths]
    errors = [abs(p - n) for p, ls in zip(p50, lengths, strict=True) for n in ls]
    covered = [n <= q for q, ls in zip(p90, lengths, strict=True) for n in ls]
    count = len(errors)
    return Scores(
        kendall_tau=kendall_tau_b([float(p) for p in p50], medians),
        mae_tokens=sum(errors) / count,
        within_50=sum(e <= 50 for e in errors) / count,
        within_100=sum(e <= 100 for e in errors) / count,
        p90_coverage=sum(covered) / count,
        prompts=len(lengths),
        samples=count,
    )


def split_half_tau(lengths: Sequence[Sequence[int]]) -> float:
    """Kendall's tau-b between the median of the first half of each prompt's samples and that of the rest, over
    prompts with at least two samples (NaN when fewer than two prompts have)."""
    halves = [(percentile(ls[: len(ls) // 2], 50), percentile(ls[len(ls) // 2:], 50))
              for ls in lengths if len(ls) >= 2]
    if len(halves) < 2:
        return math.nan
    return kendall_tau_b([a for a, _ in halves], [b for _, b in halves])
