"""Non-negative least-squares fits of the cost model's linear forms to measured step times. Pure.

`fit_nonnegative(rows, seconds, terms)` returns the coefficients, all >= 0, that minimise the squared error of
`row . coefficients - seconds` over the points. With so few terms the search is exhaustive: ordinary least
squares on every subset of the terms, the others fixed at 0, keeping the best fit whose coefficients are all
>= 0 (which is the non-negative least-squares optimum: that optimum is the plain fit on its own non-zero terms).
A term fixed at 0 is listed in `Fit.dropped`. R^2 is measured over the same points.

`fit_prefill` fits `base + per_token * n + per_token_sq * n^2` to (prompt tokens, seconds) points;
`fit_decode` fits `base + per_seq * b + per_ctx_token * c` to (batch, context tokens, seconds) points;
`cost_model` turns the two fits into a `CostModel`, refusing a decode fit without a positive base (a decode
step never costs nothing, and the simulator divides by it).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pdserve_tools.sim.cost import CostModel

PREFILL_TERMS = ("base", "per_token", "per_token_sq")
DECODE_TERMS = ("base", "per_seq", "per_ctx_token")


@dataclass(frozen=True, slots=True)
class PrefillPoint:
    tokens: int  # prompt tokens, none of them cached
    seconds: float  # the prefill's engine time (a median of repeats)


@dataclass(frozen=True, slots=True)
class DecodePoint:
    batch: int  # sequences in the step
    context_tokens: int  # KV tokens those sequences hold, in all
    seconds: float  # one decode step's engine time (a median of steps)


@dataclass(frozen=True, slots=True)
class Fit:
    terms: tuple[str, ...]
    coefficients: tuple[float, ...]  # one per term, each >= 0; 0.0 for a dropped term
    dropped: tuple[str, ...]  # terms fixed at 0 because their free coefficient came out negative
    r2: float  # 1 - residual / total sum of squares over the fitted points

    def predict(self, row: Sequence[float]) -> float:
        return sum(c * x for c, x in zip(self.coefficients, row, strict=True))

    def coefficient(self, term: str) -> float:
        return self.coefficients[self.terms.index(term)]


def fit_nonnegative(rows: Sequence[Sequence[float]], seconds: Sequence[float], terms: Sequence[str]) -> Fit:
    """The least-squares fit of `seconds` by `rows` (one row of len(terms) features per point), coefficients >= 0."""
    x = np.asarray(rows, dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(terms) or x.shape[0] != y.shape[0]:
        raise ValueError(f"need one row of {len(terms)} features per measured time")
    if x.shape[0] < len(terms):
        raise ValueError(f"fitting {len(terms)} terms needs at least {len(terms)} points, got {x.shape[0]}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("measured points must be finite")
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0  # columns of very different sizes (1 and n^2) are solved at a common scale
    best: tuple[float, np.ndarray] | None = None
    for size in range(len(terms), 0, -1):
        for keep in itertools.combinations(range(len(terms)), size):
            cols = list(keep)
            solved, *_ = np.linalg.lstsq(x[:, cols] / scale[cols], y, rcond=None)
            if (solved < 0).any():
                continue
            coef = np.zeros(len(terms))
            coef[cols] = solved / scale[cols]
            sse = float(((x @ coef - y) ** 2).sum())
            if best is None or sse < best[0]:
                best = (sse, coef)
    if best is None:  # every single-term fit is negative: all the times are negative
        best = (float((y**2).sum()), np.zeros(len(terms)))
    sse, coef = best
    sst = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - sse / sst if sst > 0 else (1.0 if sse == 0 else 0.0)
    return Fit(tuple(terms), tuple(float(c) for c in coef), tuple(t for t, c in zip(terms, coef, strict=True)
                                                                   if c == 0), r2)


def prefill_row(tokens: int) -> tuple[float, float, float]:
    return (1.0, float(tokens), float(tokens) ** 2)


def decode_row(batch: int, context_tokens: int) -> tuple[float, float, float]:
    return (1.0, float(batch), float(context_tokens))


def fit_prefill(points: Sequence[PrefillPoint]) -> Fit:
    return fit_nonnegative([prefill_row(p.tokens) for p in points], [p.seconds for p in points], PREFILL_TERMS)


def fit_decode(points: Sequence[DecodePoint]) -> Fit:
    return fit_nonnegative([decode_row(p.batch, p.context_tokens) for p in points], [p.seconds for p in points],
                           DECODE_TERMS)


def cost_model(prefill: Fit, decode: Fit, transfer_per_token_s: float, kv_capacity_tokens: int) -> CostModel:
    """The fitted coefficients as a `CostModel`; a decode fit whose base came out 0 is refused."""
    if decode.coefficient("base") <= 0:
        raise ValueError("the decode fit has no positive base time per step: measure more batch sizes and "
                         "contexts (--batches, --contexts) or more steps per point (--decode-steps)")
    return CostModel(
        prefill_base_s=prefill.coefficient("base"),
        prefill_per_token_s=prefill.coefficient("per_token"),
        prefill_per_token_sq_s=prefill.coefficient("per_token_sq"),
        decode_base_s=decode.coefficient("base"),
        decode_per_seq_s=decode.coefficient("per_seq"),
        decode_per_ctx_token_s=decode.coefficient("per_ctx_token"),
        transfer_per_token_s=transfer_per_token_s,
        kv_capacity_tokens=kv_capacity_tokens,
    )
