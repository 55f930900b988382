"""`Tally` keeps samples as Prometheus does: cumulative counts per upper bound, then all of them and their sum."""

from __future__ import annotations

import pytest

from common.histogram import Tally
from common.loop_lag import LAG_BUCKETS


def test_the_tally_keeps_samples_as_a_cumulative_histogram() -> None:
    tally = Tally(LAG_BUCKETS)
    for seconds in (0.0005, 0.003, 0.003, 0.2, 7.0):
        tally.observe(seconds)
    h = tally.histogram()
    assert (h.count, round(h.total, 4)) == (5, 7.2065)
    # bounds 1 ms, 2.5 ms, 5 ms, ... 0.25 s, ... 5 s; the 7 s sample is above them all (+Inf only)
    assert h.le[0] == 1 and h.le[1] == 1 and h.le[2] == 3 and h.le[7] == 4 and h.le[-1] == 4


def test_a_sample_on_a_bound_counts_in_that_bucket_and_buckets_read_as_prometheus_writes_them() -> None:
    tally = Tally((0.5, 1.0, 2.0))
    for value in (0.5, 1.0, 1.5, 3.0):
        tally.observe(value)
    h = tally.histogram()
    assert h.bounds == (0.5, 1.0, 2.0) and h.le == (1, 2, 3)
    assert h.buckets() == [("0.5", 1.0), ("1.0", 2.0), ("2.0", 3.0), ("+Inf", 4.0)]


def test_each_snapshot_is_its_own_and_a_new_tally_is_empty() -> None:
    tally = Tally((1.0,))
    before = tally.histogram()
    tally.observe(0.5)
    assert (before.le, before.count, before.total) == ((0,), 0, 0.0)
    assert tally.histogram().le == (1,)


@pytest.mark.parametrize("bounds", [(), (1.0, 0.5), (1.0, 1.0)])
def test_bounds_must_increase(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        Tally(bounds)
