"""The cost model's fit: known coefficients back from synthetic step times, and coefficients kept >= 0."""

import random

import numpy as np
import pytest

from pdserve_tools.sim.fit import (
    DecodePoint,
    PrefillPoint,
    cost_model,
    fit_decode,
    fit_nonnegative,
    fit_prefill,
    prefill_row,
)

LENGTHS = [16, 32, 64, 128, 256, 512, 1024, 2048]
BATCHES, CONTEXTS = [1, 4, 16, 64], [128, 512, 1024]


def prefill_points(base, per_token, per_token_sq, noise=0.0, repeats=1, seed=0):
    rng = random.Random(seed)
    return [PrefillPoint(n, (base + per_token * n + per_token_sq * n * n) * (1 + rng.gauss(0, noise)))
            for _ in range(repeats) for n in LENGTHS]


def decode_points(base, per_seq, per_ctx_token, noise=0.0, repeats=1, seed=0):
    rng = random.Random(seed)
    return [DecodePoint(b, b * c, (base + per_seq * b + per_ctx_token * b * c) * (1 + rng.gauss(0, noise)))
            for _ in range(repeats) for b in BATCHES for c in CONTEXTS]


def test_exact_points_give_back_their_coefficients():
    prefill = fit_prefill(prefill_points(5e-3, 4e-5, 1e-8))
    decode = fit_decode(decode_points(8e-3, 1e-4, 2e-7))
    assert prefill.coefficients == pytest.approx((5e-3, 4e-5, 1e-8), rel=1e-6)
    assert decode.coefficients == pytest.approx((8e-3, 1e-4, 2e-7), rel=1e-6)
    assert prefill.r2 == pytest.approx(1.0) and decode.r2 == pytest.approx(1.0)
    assert prefill.dropped == decode.dropped == ()


def test_noisy_points_give_back_their_coefficients_closely():
    # 2% noise on each time, 20 repeats of every point: what a quiet machine's step times look like
    prefill = fit_prefill(prefill_points(5e-3, 4e-5, 1e-8, noise=0.02, repeats=20, seed=1))
    decode = fit_decode(decode_points(8e-3, 1e-4, 2e-7, noise=0.02, repeats=20, seed=2))
    assert prefill.coefficient("base") == pytest.approx(5e-3, rel=0.25)
    assert prefill.coefficient("per_token") == pytest.approx(4e-5, rel=0.1)
    assert prefill.coefficient("per_token_sq") == pytest.approx(1e-8, rel=0.1)
    assert decode.coefficients == pytest.approx((8e-3, 1e-4, 2e-7), rel=0.1)
    assert 0.95 < prefill.r2 <= 1 and 0.9 < decode.r2 <= 1
    # the fitted model predicts the noiseless times within a few percent across the whole range
    for n in LENGTHS:
        assert prefill.predict(prefill_row(n)) == pytest.approx(5e-3 + 4e-5 * n + 1e-8 * n * n, rel=0.05)


def test_a_term_that_comes_out_negative_is_fixed_at_zero_and_the_rest_refitted():
    # concave prefill times: a free fit gives the square term a negative coefficient
    points = [PrefillPoint(n, 4e-3 + 6e-5 * n - 1e-8 * n * n) for n in LENGTHS]
    free = np.linalg.lstsq(np.array([prefill_row(p.tokens) for p in points]), [p.seconds for p in points],
                           rcond=None)[0]
    assert free[2] < 0
    fit = fit_prefill(points)
    assert fit.dropped == ("per_token_sq",)
    two_terms = np.linalg.lstsq(np.array([[1.0, p.tokens] for p in points]), [p.seconds for p in points],
                                rcond=None)[0]
    assert fit.coefficients == pytest.approx((two_terms[0], two_terms[1], 0.0), rel=1e-9)
    assert all(c >= 0 for c in fit.coefficients)


def test_falling_times_leave_only_the_base_the_mean():
    points = [PrefillPoint(n, 0.02 - 5e-6 * n) for n in LENGTHS]
    fit = fit_prefill(points)
    assert set(fit.dropped) == {"per_token", "per_token_sq"}
    assert fit.coefficient("base") == pytest.approx(sum(p.seconds for p in points) / len(points))


@pytest.mark.parametrize("seed", range(20))
def test_the_fit_is_the_non_negative_least_squares_optimum(seed):
    nnls = pytest.importorskip("scipy.optimize").nnls  # an independent solver as the reference
    rng = np.random.default_rng(seed)
    rows = rng.uniform(0, 3, size=(12, 3))
    rows[:, 0] = 1.0
    seconds = rows @ rng.normal(0, 1, size=3) + rng.normal(0, 0.3, size=12)
    fit = fit_nonnegative(rows.tolist(), seconds.tolist(), ("a", "b", "c"))
    reference, _ = nnls(rows, seconds)
    assert min(fit.coefficients) >= 0
    sse = float(((rows @ np.array(fit.coefficients) - seconds) ** 2).sum())
    assert sse == pytest.approx(float(((rows @ reference - seconds) ** 2).sum()), rel=1e-9, abs=1e-12)


def test_a_decode_fit_without_a_positive_base_makes_no_cost_model():
    prefill = fit_prefill(prefill_points(5e-3, 4e-5, 1e-8))
    # times below a line through the origin: the base comes out negative and is fixed at 0
    decode = fit_decode([DecodePoint(b, b * c, 1e-4 * b + 1e-7 * b * c - 1e-3) for b in (16, 32, 64)
                         for c in CONTEXTS])
    assert "base" in decode.dropped
    with pytest.raises(ValueError, match="positive base"):
        cost_model(prefill, decode, 1e-7, 10_000)
    good = cost_model(prefill, fit_decode(decode_points(8e-3, 1e-4, 2e-7)), 1e-7, 10_000)
    assert good.prefill_s(100) == pytest.approx(5e-3 + 4e-5 * 100 + 1e-8 * 100**2)
    assert good.step_s(4, 2000) == pytest.approx(8e-3 + 4e-4 + 4e-4)
    assert good.transfer_per_token_s == 1e-7 and good.kv_capacity_tokens == 10_000


def test_too_few_or_non_finite_points_are_refused():
    with pytest.raises(ValueError, match="at least 3 points"):
        fit_prefill(prefill_points(5e-3, 4e-5, 1e-8)[:2])
    with pytest.raises(ValueError, match="finite"):
        fit_prefill([*prefill_points(5e-3, 4e-5, 1e-8), PrefillPoint(10, float("nan"))])
