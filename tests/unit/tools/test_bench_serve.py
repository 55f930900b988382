"""`pdserve bench serve`'s own logic: rate parsing, the ratio and search rows of its report, dataset choices,
the concurrency cap of a run, and the plots' data (no server, no engine)."""

from __future__ import annotations

import argparse
import asyncio
import math

import pytest

from pdserve_tools.bench.plots import cdf, rate_points
from pdserve_tools.bench.serve import (
    Plan,
    parse_finite_rate,
    parse_rate,
    reference_of,
    run_once,
    search_rows,
    throughput_rows,
    to_json,
)
from pdserve_tools.bench.serve_data import cap_outputs, check_dataset, random_workload
from pdserve_tools.bench.serve_metrics import Probe, RequestTrace, SearchResult, summarize
from pdserve_tools.bench.workload import ArrivalConfig, BenchRequest
from pdserve_tools.slo import Slo

SLO = Slo(ttft_s=0.5, tpot_s=0.1)


def _metrics(ttft: float, tpot: float, count: int = 4, duration: float = 2.0):
    traces = [RequestTrace(0.0, (ttft, ttft + tpot), (1, 1), prompt_tokens=10) for _ in range(count)]
    return summarize(traces, duration, SLO)


def test_rates_accept_inf_and_refuse_non_positive_or_garbage():
    assert parse_rate("0.5") == 0.5 and math.isinf(parse_rate("inf"))
    for bad in ("0", "-1", "fast"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_rate(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="finite"):
        parse_finite_rate("inf")


def test_reference_is_pdserve_disagg_when_run_else_the_first_target():
    assert reference_of(["vllm", "pdserve-disagg"]) == "pdserve-disagg"
    assert reference_of(["vllm-2x", "vllm"]) == "vllm-2x"


def test_throughput_rows_give_each_target_its_ratio_to_the_reference():
    ref = _metrics(ttft=0.2, tpot=0.05)  # all 4 meet the SLO: goodput 2 req/s
    other = _metrics(ttft=0.4, tpot=0.2)  # TPOT misses: goodput 0
    rows = throughput_rows({"pdserve-disagg": ref, "vllm": other}, "pdserve-disagg")
    assert rows[0] == ["pdserve-disagg", "2.000", "4.0", "2.000", "100%", "1.00", "1.00", "1.00", "1.00"]
    # goodput 0 / 2, TTFT p99 0.4 / 0.2, TPOT p99 0.2 / 0.05, same output tok/s
    assert rows[1] == ["vllm", "2.000", "4.0", "0.000", "0%", "0.00", "2.00", "4.00", "1.00"]


def test_ratios_are_dashes_when_the_reference_is_missing_or_zero():
    zero = _metrics(ttft=0.4, tpot=0.2)
    rows = throughput_rows({"a": zero, "b": _metrics(ttft=0.2, tpot=0.05)}, "a")
    assert rows[1][5] == "-"  # reference goodput 0: no ratio
    assert throughput_rows({"b": zero}, "missing")[0][5:] == ["-", "-", "-", "-"]


def test_search_rows_name_the_best_rate_and_where_it_fell_in_the_range():
    probe = Probe(1.0, 1.0, 1.0)
    results = {
        "pdserve-disagg": SearchResult(0.5, False, (probe,) * 4),
        "vllm": SearchResult(1.0, True, (probe,) * 2),
        "vllm-2x": SearchResult(None, False, (probe,)),
    }
    rows = search_rows(results, "pdserve-disagg")
    assert rows == [["pdserve-disagg", "0.500", 4, "", "1.00"], ["vllm", "1.000", 2, "above the range", "2.00"],
                    ["vllm-2x", "-", 1, "below the range", "-"]]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dataset": "file", "path": None}, "needs --dataset-path"),
    ({"dataset": "mixed", "path": "x.jsonl"}, "--dataset-path is for --dataset file"),
    ({"dataset": "sharegpt", "path": None, "input_len": 64}, "--input-len is for --dataset random"),
    ({"dataset": "random", "path": None, "input_len": 900, "output_len": 200}, "more than the engine's max_model_len"),
    ({"dataset": "random", "path": None, "range_ratio": 1.0}, "range-ratio"),
    ({"dataset": "mystery", "path": None}, "unknown dataset"),
    ({"dataset": "mixed", "path": None, "chat": True}, "--chat is for --dataset sharegpt"),
])
def test_dataset_choices_that_cannot_run_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_dataset(kwargs.pop("dataset"), kwargs.pop("path"), kwargs.pop("input_len", None), 1024, **kwargs)


def test_random_workload_lengths_stay_within_the_range_ratio():
    requests = random_workload(200, 100, 20, 0.5, seed=3)
    assert all(50 <= r.prompt_tokens <= 150 and 10 <= r.max_tokens <= 30 for r in requests)
    assert all(len(r.prompt) == r.prompt_tokens for r in requests)
    assert len({r.prompt_tokens for r in requests}) > 10


def test_outputs_are_capped_at_the_routers_limit_and_nothing_else_changes():
    requests = [BenchRequest("a", 1, 600), BenchRequest((1, 2), 2, 7)]
    assert cap_outputs(requests, 512) == [BenchRequest("a", 1, 512), BenchRequest((1, 2), 2, 7)]


class CountingDriver:
    """Answers every request after a few loop turns, counting how many are in flight at once."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.most = 0

    async def send(self, request: BenchRequest, timeout: float) -> RequestTrace:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        sent = asyncio.get_running_loop().time()
        for _ in range(5):
            await asyncio.sleep(0)
        self.in_flight -= 1
        return RequestTrace(sent, (sent,), (request.max_tokens,), request.prompt_tokens)


@pytest.mark.parametrize(("cap", "most"), [(2, 2), (None, 6)])
def test_a_run_at_rate_inf_keeps_at_most_max_concurrency_requests_in_flight(cap, most):
    requests = random_workload(6, 8, 3, 0.0, seed=0)
    plan = Plan(requests, [], (math.inf,), ArrivalConfig(), cap, 10.0, SLO, None)
    driver = CountingDriver()
    run = asyncio.run(run_once(driver, plan, math.inf, "test"))
    assert driver.most == most and run.metrics.completed == 6 and run.metrics.total_output_tokens == 18


def test_json_holds_every_target_and_rate_and_the_plot_points_read_it_back():
    requests = random_workload(4, 8, 2, 0.0, seed=0)
    plan = Plan(requests, [], (1.0, math.inf), ArrivalConfig(), None, 10.0, SLO, None)
    from pdserve_tools.bench.serve import Run, TargetResult

    def result(tpot: float) -> TargetResult:
        traces = [RequestTrace(0.0, (0.1, 0.1 + tpot), (1, 1), 8)] * 4
        return TargetResult([Run(1.0, traces, summarize(traces, 2.0, SLO)),
                             Run(math.inf, traces, summarize(traces, 1.0, SLO))])

    args = argparse.Namespace(rate=[1.0, math.inf], func=print)
    data = to_json(args, plan, {"pdserve-disagg": result(0.05), "vllm": result(0.5)})
    assert set(data["results"]) == {"pdserve-disagg", "vllm"} and "func" not in data["args"]
    assert list(data["results"]["vllm"]) == ["1", "inf"]
    assert data["results"]["vllm"]["1"]["tpots_ms"] == [pytest.approx(500.0)] * 4
    assert data["results"]["vllm"]["1"]["chunk_times_ms"] == [[100, 600]] * 4
    assert data["results"]["vllm"]["1"]["engine_steps"] is None  # a target that does not report them
    assert rate_points(data, "pdserve-disagg") == [(1.0, 2.0, 1.0)]  # inf has no place on a rate axis
    assert rate_points(data, "vllm") == [(1.0, 0.0, 0.0)]


def test_json_keeps_each_requests_chunk_arrivals_in_ms_after_its_send():
    from pdserve_tools.bench.serve import samples_json

    traces = [RequestTrace(100.0, (100.1204, 100.1506, 101.2), (1, 2, 1), 8),
              RequestTrace(100.5, (100.9,), (1,), 8, error="timeout"),  # failed: the chunk it got is kept
              RequestTrace(101.0, (), (), 8, error="refused")]
    data = samples_json(traces)
    assert data["chunk_times_ms"] == [[120, 151, 1200], [400], []]
    assert all(isinstance(ms, int) for times in data["chunk_times_ms"] for ms in times)
    assert data["output_lens"] == [4, 1, 0]


def test_engine_step_times_of_a_run_come_from_the_routers_metrics_before_and_after_it():
    from prometheus_client import generate_latest

    from common.histogram import Tally
    from common.results import EngineInfo, EngineStats
    from pdserve_tools.bench.serve_engines import EngineCounters, legs, step_times
    from router.metrics import RouterMetrics
    from router.registry import Instance
    from worker.steps import STEP_BUCKETS

    info = EngineInfo(max_model_len=1024, block_size=16, num_blocks=64)
    prefill = Instance("prefill-0", "prefill", None, info, None)
    decode = Instance("decode-0", "decode", None, info, None)
    metrics = RouterMetrics()
    metrics.watch_pool(lambda: [prefill, decode], lambda: 0)
    p_steps, d_steps = Tally(STEP_BUCKETS), Tally(STEP_BUCKETS)
    p_steps.observe(0.3)  # before the run
    prefill.stats = EngineStats(preemptions=1, step_time=p_steps.histogram())
    decode.stats = EngineStats(step_time=d_steps.histogram())
    metrics.legs.labels("split").inc(5)  # before the run
    before = EngineCounters.parse(generate_latest(metrics.registry).decode())
    metrics.legs.labels("split").inc(3)
    metrics.legs.labels("whole").inc(2)
    for seconds in (0.6, 0.7, 0.8, 0.9):  # the run's prefills: all in the (0.5, 1] bucket
        p_steps.observe(seconds)
    for _ in range(99):
        d_steps.observe(0.02)
    d_steps.observe(2.0)  # one slow decode step
    prefill.stats = EngineStats(preemptions=3, step_time=p_steps.histogram())
    decode.stats = EngineStats(step_time=d_steps.histogram())
    after = EngineCounters.parse(generate_latest(metrics.registry).decode())
    assert after.preemptions - before.preemptions == 2
    assert legs(before, after) == {"split": 3, "whole": 2}
    steps = step_times(before, after)
    assert list(steps) == ["decode-0", "prefill-0"]
    assert steps["prefill-0"]["role"] == "prefill" and steps["prefill-0"]["steps"] == 4
    assert steps["prefill-0"]["mean_ms"] == pytest.approx(750.0)
    assert steps["prefill-0"]["p50_ms"] == pytest.approx(750.0)  # interpolated inside (0.5 s, 1 s]
    assert steps["decode-0"]["steps"] == 100 and steps["decode-0"]["mean_ms"] == pytest.approx(39.8)
    assert 10.0 < steps["decode-0"]["p50_ms"] <= 25.0 and steps["decode-0"]["p99_ms"] <= 25.0
    # An instance that took no step in the run has no figures.
    assert step_times(after, after)["decode-0"] == {"role": "decode", "steps": 0, "mean_ms": None, "p50_ms": None,
                                                     "p99_ms": None}


def test_cdf_skips_missing_samples_and_ends_at_one():
    assert cdf([3.0, None, 1.0, 2.0]) == ([1.0, 2.0, 3.0], [1 / 3, 2 / 3, 1.0])
    assert cdf([None]) == ([], [])


def test_write_plots_draws_a_cdf_per_rate_and_the_rate_plot_for_a_search(tmp_path):
    pytest.importorskip("matplotlib")
    from pdserve_tools.bench.plots import write_plots

    run = {"rate_rps": "1", "ttfts_ms": [10.0, 20.0], "tpots_ms": [5.0, None], "request_goodput": 1.0,
           "slo_attainment": 1.0}
    probe = dict(run, rate_rps="2", request_goodput=0.5, slo_attainment=0.5)
    data = {"args": {"search_target": 0.9}, "results": {"a": {"1": run}, "b": {"1": run}},
            "search": {"a": {"runs": [probe]}}}
    paths = write_plots(data, tmp_path / "plots", "serve")
    assert [p.name for p in paths] == ["serve-cdf-1.png", "serve-rates.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for p in paths)


def test_write_plots_draws_the_rate_plot_for_two_finite_rates_and_not_for_one_beside_inf(tmp_path):
    pytest.importorskip("matplotlib")
    from pdserve_tools.bench.plots import write_plots

    def runs(*rates: str) -> dict[str, object]:
        run = {"ttfts_ms": [10.0], "tpots_ms": [5.0], "request_goodput": 1.0, "slo_attainment": 1.0}
        return {"args": {}, "results": {"a": {r: dict(run, rate_rps=r) for r in rates}}}

    paths = write_plots(runs("1", "2"), tmp_path / "two", "serve")
    assert [p.name for p in paths] == ["serve-cdf-1.png", "serve-cdf-2.png", "serve-rates.png"]
    paths = write_plots(runs("1", "inf"), tmp_path / "inf", "serve")
    assert [p.name for p in paths] == ["serve-cdf-1.png", "serve-cdf-inf.png"]  # one finite rate: nothing to plot


def test_target_specs_refuse_unknown_targets_and_grpc_for_vllm_peers():
    from pdserve.config import config_from_dict
    from pdserve_tools.bench.serve_targets import TargetSpec

    base = config_from_dict({})
    assert TargetSpec("pdserve-disagg", base, None, "grpc").engine == base.engine
    assert TargetSpec("vllm", base, "/models/m").engine.model == "/models/m"
    with pytest.raises(ValueError, match="pdserve targets only"):
        TargetSpec("vllm-2x", base, None, "grpc")
    with pytest.raises(ValueError, match="unknown target"):
        TargetSpec("sglang", base, None)


def test_the_placement_benchmark_config_loads_with_its_committed_predictor():
    from pathlib import Path

    from pdserve.config import config_from_dict, load_config
    from pdserve_tools.bench.serve_targets import target_data
    from router.predictor.head import load_head

    root = Path(__file__).resolve().parents[3]
    base = load_config(root / "tools/pdserve_tools/bench/placement.yaml")
    assert base.router.predictor is not None
    load_head(root / base.router.predictor)
    projected = config_from_dict(target_data(base, "pdserve-1p2d-projected", None))
    least = config_from_dict(target_data(base, "pdserve-1p2d", None))
    assert (projected.router.policy, least.router.policy) == ("projected_kv", "least_outstanding")
    assert projected.workers == least.workers and projected.workers.decode.instances == 2


def test_the_sooner_target_is_1p1d_splitting_only_when_that_is_sooner_under_the_bench_tpot_objective():
    import dataclasses

    from pdserve.config import SloConfig, config_from_dict
    from pdserve_tools.bench.serve_targets import target_data

    base = config_from_dict({})
    base = dataclasses.replace(base, router=dataclasses.replace(base.router, slo=SloConfig(tpot_ms=150.0)))
    sooner = config_from_dict(target_data(base, "pdserve-sooner", None))
    always = config_from_dict(target_data(base, "pdserve-disagg", None))
    assert (sooner.router.split_policy, sooner.router.slo.tpot_ms) == ("sooner", 150.0)
    assert always.router.split_policy == "always"
    assert sooner.workers == always.workers
