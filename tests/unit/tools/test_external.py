"""`pdserve bench external`'s pure parts: guidellm's JSON report read into levels, the median over runs, the ratios
of the report, the router probe's parsing and quantile (no server, no guidellm)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pdserve_tools.bench import guidellm
from pdserve_tools.bench.external import (
    Level,
    level_rows,
    level_seed,
    median_level,
    median_levels,
    ratio,
    summarize,
    to_json,
)
from pdserve_tools.bench.external import TargetResult as Result
from pdserve_tools.bench.router_probe import (
    RouterLoad,
    Sample,
    Window,
    around,
    bucket_delta,
    buckets,
    cpu_at,
    cpu_seconds,
    histogram_quantile,
    load_over,
    mean_between,
    sum_count,
    sum_count_by,
)

FIXTURE = Path(__file__).parent / "fixtures" / "guidellm_report.json"


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads(FIXTURE.read_text())


def _level(streams: int = 4, ttft: float = 100.0, itl: float = 10.0, errors: float = 0.0, rps: float = 1.0) -> Level:
    return Level(streams, ttft, ttft * 2, itl, itl * 2, errors, rps)


# ---- guidellm's report ---------------------------------------------------------------------------------------


def test_a_real_report_gives_one_level_per_benchmark_in_order(report):
    runs = guidellm.parse_report(report)
    assert [r.streams for r in runs] == [1, 2]
    one, two = runs
    assert (one.successful, one.errored, one.incomplete) == (0, 0, 1)
    assert (two.successful, two.errored, two.incomplete) == (8, 4, 2)
    assert two.duration_s == 10.0
    assert two.end - two.start == pytest.approx(10.0)
    assert one.end <= two.start


def test_latencies_are_guidellms_own_per_request_figures_cut_off_requests_included(report):
    two = guidellm.parse_report(report)[1]
    requests = report["benchmarks"][1]["requests"]
    served = [*requests["successful"], *requests["incomplete"]]
    assert two.ttfts_ms == tuple(r["time_to_first_token_ms"] for r in served)
    assert two.itls_ms == tuple(r["inter_token_latency_ms"] for r in served)
    assert len(two.ttfts_ms) == 8 + 2
    own = report["benchmarks"][1]["metrics"]["time_to_first_token_ms"]["successful"]
    assert len(two.finished_ttfts_ms) == own["count"]
    assert sum(two.finished_ttfts_ms) / own["count"] == pytest.approx(own["mean"])


def test_streamed_tokens_count_incomplete_requests_and_errors_keep_the_first_message(report):
    one, two = guidellm.parse_report(report)
    assert one.output_tokens == 135  # the one request guidellm cut off still streamed its tokens
    assert two.output_tokens == 8 * 2 + 92 + 137
    assert two.first_error is not None and "400 Bad Request" in two.first_error
    assert one.first_error is None


def test_requests_per_second_count_successful_requests_only(report):
    one, two = guidellm.parse_report(report)
    assert one.req_per_s == 0.0
    assert two.req_per_s == pytest.approx(8 / 10.0)


def test_a_level_without_a_finished_request_still_has_the_first_token_of_the_one_cut_off(report):
    one = guidellm.parse_report(report)[0]
    assert one.finished_ttfts_ms == () and len(one.ttfts_ms) == 1
    level = summarize(one)
    assert level.ttft_p50 == level.ttft_p90 == pytest.approx(one.ttfts_ms[0])


def test_a_level_without_a_first_token_has_no_latency_and_writes_null():
    level = summarize(guidellm.LevelRun(16, (), (), (), 0, 0, 16, 30.0, 0.0, 30.0, 0))
    assert math.isnan(level.ttft_p50) and math.isnan(level.itl_p90)
    assert level.to_json() == {"streams": 16, "ttft_p50": None, "ttft_p90": None, "itl_p50": None, "itl_p90": None,
                               "errors": 0.0, "req_per_s": 0.0}


def test_summary_percentiles_interpolate_like_every_other_tool():
    run = guidellm.LevelRun(2, (400.0, 100.0, 300.0, 200.0), (10.0, 20.0), (), 4, 1, 0, 10.0, 0.0, 10.0, 40)
    level = summarize(run)
    assert level.ttft_p50 == 250.0  # 4 samples: between the middle two, as numpy's default
    assert level.ttft_p90 == pytest.approx(370.0)
    assert (level.itl_p50, level.errors, level.req_per_s) == (15.0, 1.0, 0.4)


def test_the_command_runs_one_concurrent_level_into_a_json_report(tmp_path):
    workload = guidellm.Workload(256, 128, 30, "/models/smol")
    cmd = guidellm.level_command(Path("/v/bin/guidellm"), "http://127.0.0.1:8000", 8, workload, tmp_path / "r.json",
                                 1008)
    assert cmd[:2] == ["/v/bin/guidellm", "run"]
    flags = dict(zip(cmd[2::2], cmd[3::2], strict=False))
    assert flags["--backend"] == "kind=openai_http,target=http://127.0.0.1:8000"
    assert flags["--data"] == "kind=synthetic_text,prompt_tokens=256,output_tokens=128"
    assert flags["--profile"] == "kind=concurrent,streams=8"
    assert flags["--constraint"] == "kind=max_duration,seconds=30"
    assert flags["--output"] == f"kind=json,path={tmp_path / 'r.json'}"
    assert flags["--tokenizer"] == "kind=huggingface_auto,model=/models/smol"
    assert flags["--seed"] == "kind=static,value=1008"


def test_every_level_and_run_draws_new_prompts_and_every_target_the_same():
    seeds = [level_seed(run, streams) for run in range(3) for streams in (1, 2, 4, 8, 16)]
    assert len(set(seeds)) == len(seeds)
    assert level_seed(0, 16) == level_seed(0, 16)


def test_the_installed_version_is_read_from_the_metadata_folder(tmp_path):
    assert guidellm.installed_version(tmp_path) is None
    (tmp_path / "lib" / "python3.11" / "site-packages" / "guidellm-0.8.1.dist-info").mkdir(parents=True)
    assert guidellm.installed_version(tmp_path) == "0.8.1"


def test_guidellm_is_never_installed_into_the_running_environment():
    import sys

    with pytest.raises(ValueError, match="environment running pdserve"):
        guidellm.ensure_guidellm(Path(sys.prefix))


# ---- median over runs ----------------------------------------------------------------------------------------


def test_the_median_is_taken_per_figure_over_runs():
    runs = [_level(ttft=100, errors=0, rps=1.0), _level(ttft=300, errors=2, rps=0.5), _level(ttft=200, errors=1,
                                                                                          rps=2.0)]
    med = median_level(runs)
    assert (med.ttft_p50, med.ttft_p90, med.errors, med.req_per_s) == (200, 400, 1, 1.0)


def test_the_median_of_two_runs_is_their_mean_and_skips_a_run_that_measured_nothing():
    assert median_level([_level(ttft=100), _level(ttft=200)]).ttft_p50 == 150
    empty = Level(4, math.nan, math.nan, math.nan, math.nan, 0.0, 0.0)
    assert median_level([empty, _level(ttft=100)]).ttft_p50 == 100
    assert math.isnan(median_level([empty]).ttft_p50)


def test_medians_pair_levels_by_streams_in_the_first_runs_order():
    runs = [[_level(1, ttft=10), _level(16, ttft=1000)], [_level(16, ttft=3000), _level(1, ttft=30)]]
    assert [(lv.streams, lv.ttft_p50) for lv in median_levels(runs)] == [(1, 20), (16, 2000)]


def test_the_median_refuses_runs_of_different_levels():
    with pytest.raises(ValueError):
        median_level([_level(1), _level(2)])
    with pytest.raises(ValueError):
        median_level([])


# ---- ratios and the JSON -------------------------------------------------------------------------------------


def test_ratios_are_to_the_reference_and_missing_where_either_side_is():
    assert ratio(300, 150) == 2.0
    assert ratio(1, 0) is None and ratio(None, 1) is None and ratio(math.nan, 1) is None


def test_level_rows_carry_each_targets_ratios_to_the_reference():
    rows = level_rows({"pdserve-1p1d": _level(ttft=300, itl=20, rps=0.5), "vllm-2x": _level(ttft=100, itl=10)},
                      "vllm-2x")
    pd, ref = rows
    assert pd[0] == "pdserve-1p1d" and pd[1] == "300" and pd[-5:] == ["3.00", "3.00", "2.00", "2.00", "0.50"]
    assert ref[-5:] == ["1.00"] * 5
    assert level_rows({"pdserve-1p1d": _level()}, "vllm-2x")[0][-5:] == ["-"] * 5


def test_the_json_has_exactly_the_documented_shape():
    light = RouterLoad(0.002, 5.0, 1100.0, 1105.0, engine_step_ms={"decode": 60.0, "prefill": 1050.0})
    heavy = RouterLoad(0.0004, 12.5, 900.0, math.nan, 1)
    data = to_json({"pdserve-1p1d": Result([_level(1), _level(16)], {16: heavy, 1: light}),
                    "vllm-2x": Result([_level(1)], {})})
    assert set(data) == {"targets", "router"}
    assert set(data["targets"]) == {"pdserve-1p1d", "vllm-2x"}
    assert set(data["targets"]["pdserve-1p1d"]["levels"][0]) == {"streams", "ttft_p50", "ttft_p90", "itl_p50",
                                                                 "itl_p90", "errors", "req_per_s"}
    heavy_json = {"cpu_s_per_token": 0.0004, "loop_lag_p99_ms": 12.5, "router_ttft_mean_ms": 900.0,
                  "client_ttft_mean_ms": None, "missed_scrapes": 1, "engine_step_ms": {}}
    light_json = {"cpu_s_per_token": 0.002, "loop_lag_p99_ms": 5.0, "router_ttft_mean_ms": 1100.0,
                  "client_ttft_mean_ms": 1105.0, "missed_scrapes": 0,
                  "engine_step_ms": {"decode": 60.0, "prefill": 1050.0}}
    # the highest level on top, every level (by streams) under "levels"
    assert data["router"] == {"pdserve-1p1d": {**heavy_json, "levels": [{"streams": 1, **light_json},
                                                                        {"streams": 16, **heavy_json}]}}
    json.dumps(data, allow_nan=False)


# ---- the router probe ----------------------------------------------------------------------------------------

METRICS = """# HELP pdserve_event_loop_lag_seconds lag
# TYPE pdserve_event_loop_lag_seconds histogram
pdserve_event_loop_lag_seconds_bucket{{le="0.001"}} {a}
pdserve_event_loop_lag_seconds_bucket{{le="0.01"}} {b}
pdserve_event_loop_lag_seconds_bucket{{le="0.1"}} {c}
pdserve_event_loop_lag_seconds_bucket{{le="+Inf"}} {c}
pdserve_event_loop_lag_seconds_count {c}
pdserve_event_loop_lag_seconds_sum 1.0
# HELP pdserve_time_to_first_token_seconds ttft
# TYPE pdserve_time_to_first_token_seconds histogram
pdserve_time_to_first_token_seconds_bucket{{le="+Inf"}} {n}
pdserve_time_to_first_token_seconds_count {n}
pdserve_time_to_first_token_seconds_sum {s}
# HELP pdserve_engine_step_seconds steps
# TYPE pdserve_engine_step_seconds histogram
pdserve_engine_step_seconds_bucket{{instance="prefill-0",role="prefill",le="+Inf"}} {p}
pdserve_engine_step_seconds_count{{instance="prefill-0",role="prefill"}} {p}
pdserve_engine_step_seconds_sum{{instance="prefill-0",role="prefill"}} {ps}
pdserve_engine_step_seconds_bucket{{instance="decode-0",role="decode",le="+Inf"}} {d}
pdserve_engine_step_seconds_count{{instance="decode-0",role="decode"}} {d}
pdserve_engine_step_seconds_sum{{instance="decode-0",role="decode"}} {ds}
pdserve_engine_step_seconds_bucket{{instance="decode-1",role="decode",le="+Inf"}} {d}
pdserve_engine_step_seconds_count{{instance="decode-1",role="decode"}} {d}
pdserve_engine_step_seconds_sum{{instance="decode-1",role="decode"}} {ds}
"""


def _metrics(a: int = 0, b: int = 0, c: int = 0, n: int = 0, s: float = 0.0, p: int = 0, ps: float = 0.0,
             d: int = 0, ds: float = 0.0) -> str:
    return METRICS.format(a=a, b=b, c=c, n=n, s=s, p=p, ps=ps, d=d, ds=ds)


def test_cpu_seconds_are_utime_plus_stime_even_with_a_strange_command_name():
    fields = ["S"] + ["0"] * 10 + ["250", "50"] + ["0"] * 30
    assert cpu_seconds(f"4242 (py (x) y) {' '.join(fields)}", 100) == 3.0


def test_the_lag_quantile_is_over_the_samples_between_two_scrapes():
    before = buckets(_metrics(a=100, b=100, c=100), "pdserve_event_loop_lag_seconds")
    after = buckets(_metrics(a=150, b=190, c=200), "pdserve_event_loop_lag_seconds")
    delta = bucket_delta(before, after)
    assert delta == [(0.001, 50), (0.01, 90), (0.1, 100), (math.inf, 100)]
    # rank 99 of 100 falls in (0.01, 0.1], 9 of its 10 samples in: 0.01 + 0.09 * 0.9
    assert histogram_quantile(0.99, delta) == pytest.approx(0.091)
    assert histogram_quantile(0.5, delta) == pytest.approx(0.001)


def test_the_quantile_of_nothing_is_nan_and_one_past_the_last_bound_is_that_bound():
    assert math.isnan(histogram_quantile(0.99, [(0.1, 0), (math.inf, 0)]))
    assert histogram_quantile(0.99, [(0.1, 0), (math.inf, 5)]) == 0.1


def test_the_router_ttft_mean_is_over_the_requests_finished_between_two_scrapes():
    before = sum_count(_metrics(n=2, s=1.0), "pdserve_time_to_first_token_seconds")
    after = sum_count(_metrics(n=6, s=5.0), "pdserve_time_to_first_token_seconds")
    assert mean_between(before, after) == 1.0
    assert math.isnan(mean_between(after, after))


def test_router_loads_take_the_median_over_runs():
    med = RouterLoad.median([RouterLoad(1.0, 10.0, 1.0, 1.0, engine_step_ms={"decode": 50.0}),
                             RouterLoad(3.0, math.nan, 2.0, 2.0, 1, {"decode": 70.0, "prefill": 900.0}),
                             RouterLoad(2.0, 30.0, 3.0, 3.0, 2, {"decode": 60.0})])
    assert (med.cpu_s_per_token, med.loop_lag_p99_ms, med.missed_scrapes) == (2.0, 20.0, 3)
    assert med.engine_step_ms == {"decode": 60.0, "prefill": 900.0}  # a role's median over the runs it stepped in
    assert RouterLoad(math.nan, math.nan, 0, 0).to_json()["loop_lag_p99_ms"] is None


def test_step_sums_and_counts_add_up_over_the_instances_of_a_role():
    text = _metrics(p=2, ps=2.0, d=10, ds=0.6)
    assert sum_count_by(text, "pdserve_engine_step_seconds", "role") == {"prefill": (2.0, 2), "decode": (1.2, 20)}
    assert sum_count_by(text, "pdserve_engine_step_seconds", None) == {"": (3.2, 22)}
    assert sum_count(text, "pdserve_no_such_histogram") == (0.0, 0.0)


def test_cpu_time_is_interpolated_at_the_windows_ends_and_clamped_outside_the_samples():
    samples = [Sample(10.0, 1.0, ""), Sample(11.0, 1.5, ""), Sample(13.0, 3.5, "")]
    assert cpu_at(samples, 10.5) == 1.25
    assert cpu_at(samples, 12.0) == 2.5
    assert cpu_at(samples, 5.0) == 1.0 and cpu_at(samples, 99.0) == 3.5


def test_the_scrapes_around_a_window_are_the_last_before_and_the_first_after():
    samples = [Sample(float(t), 0.0, str(t)) for t in range(10, 16)]
    assert [s.metrics for s in around(samples, 11.5, 13.2)] == ["11", "14"]
    assert [s.metrics for s in around(samples, 9.0, 99.0)] == ["10", "15"]


def test_the_load_over_a_window_takes_cpu_per_streamed_token_lag_and_both_ttft_means():
    first = _metrics(a=100, b=100, c=100, n=2, s=1.0, p=1, ps=1.0, d=5, ds=0.25)
    last = _metrics(a=150, b=190, c=200, n=6, s=5.0, p=2, ps=2.1, d=15, ds=0.85)
    samples = [Sample(0.0, 10.0, first), Sample(10.0, 12.0, last), Sample(20.0, 20.0, last)]
    load = load_over(samples, Window(start=0.0, end=10.0, tokens=400, client_ttfts_ms=(1200.0, 1400.0)))
    assert load.cpu_s_per_token == pytest.approx(2.0 / 400)
    assert load.loop_lag_p99_ms == pytest.approx(91.0)
    assert (load.router_ttft_mean_ms, load.client_ttft_mean_ms) == (1000.0, 1300.0)
    # 1 prefill step of 1.1 s; 20 decode steps (10 on each of two instances) of 1.2 s together
    assert load.engine_step_ms == pytest.approx({"decode": 60.0, "prefill": 1100.0})
