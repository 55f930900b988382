"""Goodput read from SLO-attainment curves (`goodput_curve`) and the `bench goodput` command's pure parts: the
crossing is interpolated, the climb stops once every SLO is missed, seeds meet at the lower median, and the
table's ratios are to the right peers."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal

import pytest

from pdserve_tools.bench.goodput import Climb, parse_share, parse_slo, slo_rows
from pdserve_tools.bench.goodput_curve import Goodput, Point, climb, max_rate, median_goodput
from pdserve_tools.bench.serve import run_to_end
from pdserve_tools.bench.serve_metrics import RequestTrace
from pdserve_tools.slo import Slo


def test_the_goodput_is_where_the_curve_first_crosses_the_target_share():
    curve = [Point(0.2, 1.0), Point(0.4, 0.95), Point(0.6, 0.75), Point(0.8, 0.95)]
    got = max_rate(curve, 0.9)
    # from (0.4, 0.95) to (0.6, 0.75): 0.9 is a quarter of the way down
    assert got.rate_rps == pytest.approx(0.45) and not got.saturated
    # the recovery at 0.8 is past the first miss, so it does not count; the order given does not matter
    assert max_rate(list(reversed(curve)), 0.9) == got
    assert max_rate([Point(0.2, 0.9), Point(0.4, 0.5)], 0.9).rate_rps == pytest.approx(0.2)


def test_a_curve_that_never_misses_is_saturated_and_one_that_starts_below_has_no_rate():
    assert max_rate([Point(0.5, 1.0), Point(1.0, 0.9)], 0.9) == Goodput(1.0, saturated=True)
    assert max_rate([Point(0.5, 0.8), Point(1.0, 1.0)], 0.9) == Goodput(None)
    with pytest.raises(ValueError, match="at least one point"):
        max_rate([], 0.9)
    with pytest.raises(ValueError, match="target share"):
        max_rate([Point(1.0, 1.0)], 0.0)


def _traces(ttft_s: float, good: int, total: int = 10) -> list[RequestTrace]:
    """`total` requests of two tokens; `good` of them have this TTFT and a 10 ms TPOT, the rest 100x both."""
    out = []
    for i in range(total):
        scale = 1.0 if i < good else 100.0
        first = ttft_s * scale
        out.append(RequestTrace(0.0, (first, first + 0.01 * scale), (1, 1)))
    return out


def test_the_climb_serves_every_slo_from_one_run_per_rate_and_stops_once_all_miss():
    loose, tight = Slo(ttft_s=1.0, tpot_s=0.05), Slo(ttft_s=0.2, tpot_s=0.05)
    ttft = {0.1: 0.1, 0.2: 0.5, 0.4: 0.5, 0.8: 0.5, 1.6: 0.5}  # from 0.2 on, the tight TTFT is missed by all
    good = {0.1: 10, 0.2: 10, 0.4: 9, 0.8: 5, 1.6: 0}  # and from 0.8 on, half the requests miss both
    ran: list[float] = []

    async def run(rate: float) -> list[RequestTrace]:
        ran.append(rate)
        return _traces(ttft[rate], good[rate])

    points = asyncio.run(climb(run, {"loose": loose, "tight": tight}, [1.6, 0.8, 0.4, 0.2, 0.1], 0.9))
    assert ran == [0.1, 0.2, 0.4, 0.8]  # lowest first; 1.6 is not run once both missed at 0.8
    assert points["loose"] == [Point(0.1, 1.0), Point(0.2, 1.0), Point(0.4, 0.9), Point(0.8, 0.5)]
    assert points["tight"] == [Point(0.1, 1.0), Point(0.2, 0.0), Point(0.4, 0.0), Point(0.8, 0.0)]
    assert max_rate(points["loose"], 0.9).rate_rps == pytest.approx(0.4)
    assert max_rate(points["tight"], 0.9).rate_rps == pytest.approx(0.1 + 0.1 * 0.1)
    with pytest.raises(ValueError, match="finite positive rates"):
        asyncio.run(climb(run, {"loose": loose}, [0.1, math.inf], 0.9))


def test_seeds_meet_at_the_lower_median_with_its_flags():
    assert median_goodput([Goodput(0.5), Goodput(None), Goodput(0.3)]) == Goodput(0.3)
    assert median_goodput([Goodput(1.0, saturated=True), Goodput(1.0), Goodput(1.0, saturated=True)]) == \
        Goodput(1.0, saturated=True)
    assert median_goodput([Goodput(0.4), Goodput(0.6)]) == Goodput(0.4)
    assert median_goodput([Goodput(None), Goodput(0.6)]) == Goodput(None)


def test_the_table_compares_each_target_to_two_vllm_servers_and_to_the_best_vllm_target():
    rows = slo_rows({"pdserve-disagg": [Goodput(0.6), Goodput(0.9), Goodput(0.8)],
                     "vllm-2x": [Goodput(0.4), Goodput(0.4), Goodput(0.5)],
                     "vllm-disagg": [Goodput(0.5), Goodput(0.5), Goodput(0.6, saturated=True)],
                     "pdserve-colocated": [Goodput(None), Goodput(None), Goodput(0.2)]})
    assert rows[0] == ["pdserve-disagg", "0.800", "0.600 0.900 0.800", "2.00", "1.60"]
    assert rows[1][3:] == ["1.00", "0.80"]
    assert rows[2][1:3] == ["0.500", "0.500 0.500 0.600+"]
    assert rows[3][1:] == ["below", "below below 0.200", "-", "-"]


def test_an_slo_is_named_with_both_objectives_in_milliseconds():
    named = parse_slo("tight:2000:150")
    assert named.name == "tight" and named.slo == Slo(ttft_s=2.0, tpot_s=0.15)
    assert named.to_json() == {"ttft_ms": 2000.0, "tpot_ms": 150.0}
    for bad in ("tight:2000", ":2000:150", "tight:2s:150", "tight:0:150", "tight:2000:inf"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME:TTFT_MS:TPOT_MS"):
            parse_slo(bad)


def test_a_run_sends_enough_requests_to_keep_arriving_for_the_minimum_duration():
    climbing = Climb({}, [], [0.5, 3.0], 0.9, least=24, min_duration_s=40.0)
    assert climbing.requests_at(0.25) == 24  # 96 s of arrivals already
    assert climbing.requests_at(3.0) == 120
    assert climbing.requests_at(0.61) == 25  # rounded up


def test_sigterm_cancels_a_benchmark_so_its_cleanup_runs():
    """The handler run_to_end installs turns SIGTERM into cancellation: the `finally` that stops a target's servers
    runs (and may await), and the benchmark exits with a message instead of dying with its servers left behind."""
    cleaned: list[str] = []
    started = asyncio.Event()

    async def bench() -> None:
        try:
            started.set()
            await asyncio.Event().wait()  # a run that would go on for ever
        finally:
            await asyncio.sleep(0)  # stopping a server awaits
            cleaned.append("stopped")

    async def main() -> None:
        task = asyncio.ensure_future(bench())
        await started.wait()
        os.kill(os.getpid(), signal.SIGTERM)
        await task

    with pytest.raises(SystemExit, match="stopped by SIGTERM"):
        run_to_end(main())
    assert cleaned == ["stopped"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again


def test_the_share_of_requests_is_checked_before_any_target_starts():
    assert parse_share("0.9") == 0.9 and parse_share("1") == 1.0
    for bad in ("0", "1.5", "most"):
        with pytest.raises(argparse.ArgumentTypeError, match="share"):
            parse_share(bad)
