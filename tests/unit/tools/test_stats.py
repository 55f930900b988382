import math

import pytest

from pdserve_tools.stats import median_interval, percentile


def test_percentile_interpolates():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))
    assert percentile(iter([4, 1, 3, 2]), 50) == 2.5  # any iterable, ints too (the median of even counts)


@pytest.mark.parametrize("n, ranks", [(100, (40, 61)), (10, (2, 9)), (3, (1, 3))])
def test_median_interval_uses_the_binomial_order_statistics(n, ranks):
    # The tabulated 95% ranks for the median; 3 values are too few, so the interval is their whole range.
    values = [float(v) for v in range(n, 0, -1)]  # order of arrival does not matter
    assert median_interval(values, 0.95) == (float(ranks[0]), float(ranks[1]))


def test_median_interval_narrows_with_confidence():
    values = [float(v) for v in range(1, 201)]
    lo90, hi90 = median_interval(values, 0.90)
    lo99, hi99 = median_interval(values, 0.99)
    assert lo99 < lo90 < 100.5 < hi90 < hi99
