"""The remaining output of a running request, conditional on what it has generated. Pure.

Contract. `remaining_given(prediction, generated, max_tokens)` returns the p50 and p90 of L - g given L > g, for a
request predicted as `prediction` that has produced g = `generated` tokens: the quantiles of the part of its
length distribution it has not yet outlived. The distribution is the lognormal through the prediction's p50 and
p90 (log-sigma = ln(p90 / p50) / z(0.9)), cut at the request's `max_tokens`; for quantile q,
L_q = F^-1(F(g) + q (1 - F(g))). So a request that has outlived its p50 is still expected to run for a while
(the plain `prediction.remaining` says one more token), and one that has run long keeps a long tail.
Results are whole tokens in [1, max_tokens - g] (0 only when nothing is left), p50 <= p90.
A prediction without spread (p50 == p90, e.g. "runs to max_tokens") or with p50 == 0 falls back to
`prediction.remaining`, which it then equals.
"""

from __future__ import annotations

import math
from statistics import NormalDist

from router.predictor.prediction import LengthPrediction, remaining

_NORMAL = NormalDist()
_Z90 = _NORMAL.inv_cdf(0.9)
_TOP = 1.0 - 1e-12  # inv_cdf needs u < 1


def remaining_given(prediction: LengthPrediction, generated: int, max_tokens: int) -> LengthPrediction:
    """The p50 and p90 of what is left to generate, given that `generated` tokens are out and the request runs on."""
    left = max(max_tokens - generated, 0)
    if left == 0 or prediction.p50 < 1 or prediction.p90 <= prediction.p50:
        return remaining(prediction, generated, max_tokens)
    mu = math.log(prediction.p50)
    sigma = math.log(prediction.p90 / prediction.p50) / _Z90
    done = _NORMAL.cdf((math.log(generated) - mu) / sigma) if generated > 0 else 0.0
    out = []
    for q in (0.5, 0.9):
        u = min(done + q * (1.0 - done), _TOP)
        length = math.exp(mu + sigma * _NORMAL.inv_cdf(u))
        out.append(min(max(math.ceil(length - 1e-6) - generated, 1), left))  # 1e-6: exp(log(n)) may exceed n
    return LengthPrediction(out[0], max(out))
