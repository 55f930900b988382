import asyncio
import json
import math

import pytest

from pdserve_tools.bench.serve_metrics import (
    Distribution,
    MetricsOptions,
    RequestTrace,
    SearchConfig,
    goodput_search,
    summarize,
    trace_span,
)
from pdserve_tools.slo import Slo

# Sent at 10.0; chunks of 1, 1, 2, 1 tokens at 10.2, 10.3, 10.5, 10.6.
FOUR_CHUNKS = RequestTrace(10.0, (10.2, 10.3, 10.5, 10.6), (1, 1, 2, 1), prompt_tokens=7)


def _trace(send: float, ttft: float, gaps: tuple[float, ...] = (), prompt: int = 10) -> RequestTrace:
    times = [send + ttft]
    for gap in gaps:
        times.append(times[-1] + gap)
    return RequestTrace(send, tuple(times), (1,) * len(times), prompt_tokens=prompt)


def test_one_trace_ttft_e2e_tpot_and_itl():
    t = FOUR_CHUNKS
    assert t.ok and t.output_tokens == 5
    assert t.ttft == pytest.approx(0.2)
    assert t.e2e == pytest.approx(0.6)
    assert t.tpot == pytest.approx(0.4 / 4)  # (e2e - ttft) / (5 - 1)
    assert t.itls() == pytest.approx([0.1, 0.2, 0.1])  # vLLM: one sample per chunk, the 2-token gap undivided
    assert t.itls(per_token=True) == pytest.approx([0.1, 0.1, 0.1, 0.1])


def test_a_one_token_request_has_no_tpot_but_meets_any_tpot_objective():
    single = RequestTrace(0.0, (0.3,), (1,))
    assert single.tpot is None and single.itls() == []
    assert single.meets(Slo(tpot_s=0.0))
    metrics = summarize([single, _trace(0.0, 0.1, (0.2,))], duration_s=1.0)
    assert metrics.tpot.count == 1 and metrics.tpot.mean == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk_times": (1.0,), "chunk_tokens": ()}, "one token count per chunk"),
        ({"chunk_times": (0.5,), "chunk_tokens": (1,)}, "not before send_time"),
        ({"chunk_times": (1.5, 1.2), "chunk_tokens": (1, 1)}, "non-decreasing"),
        ({"chunk_times": (1.5,), "chunk_tokens": (0,)}, "at least 1 token"),
        ({}, "at least one chunk"),
    ],
)
def test_malformed_traces_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RequestTrace(1.0, **kwargs)


def test_a_failed_trace_without_chunks_is_accepted_but_has_no_latency():
    failed = RequestTrace(1.0, error="UNAVAILABLE")
    assert not failed.ok and failed.output_tokens == 0
    with pytest.raises(ValueError, match="no output chunk"):
        _ = failed.ttft


def test_distribution_uses_linear_interpolation_and_population_std():
    d = Distribution.of([0.5, 0.1, 0.4, 0.2, 0.3], (90.0, 99.0, 99.9))
    assert d.count == 5 and d.mean == pytest.approx(0.3) and d.median == pytest.approx(0.3)
    assert d.std == pytest.approx(math.sqrt(0.02))
    assert d.at(90.0) == pytest.approx(0.46)  # rank (5 - 1) * 0.9 = 3.6 -> 0.4 + 0.6 * 0.1
    assert d.at(99.0) == pytest.approx(0.496)
    assert d.to_json("ttft")["p99.9_ttft_ms"] == pytest.approx(499.6)
    with pytest.raises(KeyError):
        d.at(50.0)


def test_summarize_counts_throughputs_and_distributions():
    ok = [_trace(0.0, 0.1, (0.05, 0.05), prompt=10), _trace(1.0, 0.3, (0.1,), prompt=20),
          _trace(2.0, 0.2, (), prompt=30)]
    traces = [*ok, RequestTrace(3.0, (3.5,), (1,), prompt_tokens=99, error="DEADLINE_EXCEEDED")]
    m = summarize(traces, duration_s=4.0)
    assert (m.completed, m.failed) == (3, 1)
    assert (m.total_input_tokens, m.total_output_tokens) == (60, 6)  # a failed request's tokens do not count
    assert m.request_throughput == pytest.approx(3 / 4)
    assert m.output_throughput == pytest.approx(6 / 4)
    assert m.total_token_throughput == pytest.approx(66 / 4)
    assert m.ttft.mean == pytest.approx(0.2) and m.ttft.median == pytest.approx(0.2)
    assert m.e2e.count == 3 and m.e2e.at(99.0) == pytest.approx(0.2 + 0.98 * 0.2)  # e2e: 0.2, 0.4, 0.2
    assert m.tpot.count == 2 and m.tpot.mean == pytest.approx((0.05 + 0.1) / 2)
    assert m.itl.count == 3 and m.itl.median == pytest.approx(0.05)
    assert m.request_goodput is None and m.slo_attainment is None


def test_duration_defaults_to_the_span_of_the_traces():
    traces = [_trace(1.0, 0.5, (0.5,)), _trace(2.0, 0.1, (0.1, 3.0))]
    assert trace_span(traces) == pytest.approx(5.2 - 1.0)
    assert summarize(traces).duration_s == pytest.approx(4.2)
    with pytest.raises(ValueError, match="positive"):
        summarize(traces, duration_s=0.0)
    with pytest.raises(ValueError, match="no traces"):
        summarize([])


def test_itl_per_token_option_changes_only_itl():
    vllm_style = summarize([FOUR_CHUNKS], duration_s=1.0)
    per_token = summarize([FOUR_CHUNKS], duration_s=1.0, options=MetricsOptions(itl_per_token=True))
    assert vllm_style.itl.count == 3 and vllm_style.itl.mean == pytest.approx(0.4 / 3)
    assert per_token.itl.count == 4 and per_token.itl.mean == pytest.approx(0.1)
    assert per_token.tpot == vllm_style.tpot


def test_goodput_counts_requests_meeting_every_objective_inclusively():
    # Dyadic times, so that "exactly at the objective" is exact in floating point.
    traces = [
        _trace(0.0, 0.25, (0.125, 0.125)),  # TTFT and TPOT exactly at their objectives: good
        _trace(0.0, 0.375, (0.125,)),  # TTFT misses
        _trace(0.0, 0.125, (0.25,)),  # TPOT misses
        _trace(0.0, 0.125),  # one token: TPOT counts as 0, good
        RequestTrace(0.0, error="INTERNAL"),  # failed: never good
    ]
    m = summarize(traces, duration_s=2.0, slo=Slo(ttft_s=0.25, tpot_s=0.125))
    assert m.good == 2
    assert m.request_goodput == pytest.approx(2 / 2.0)
    assert m.slo_attainment == pytest.approx(2 / 5)  # the failed request counts as a miss
    assert summarize(traces, duration_s=2.0, slo=Slo(e2e_s=0.375)).good == 2  # e2e 0.5, 0.5, 0.375, 0.125


def test_to_json_uses_vllm_keys_and_is_strict_json_even_when_everything_failed():
    m = summarize([FOUR_CHUNKS, _trace(10.0, 0.1)], duration_s=2.0, slo=Slo(ttft_s=0.15))
    out = m.to_json()
    assert out["completed"] == 2 and out["request_goodput"] == pytest.approx(0.5)
    assert out["mean_ttft_ms"] == pytest.approx(150.0) and out["p99_tpot_ms"] == pytest.approx(100.0)
    assert {"median_itl_ms", "std_e2el_ms", "p90_e2el_ms", "output_throughput"} <= set(out)
    assert out["slo"] == {"ttft_ms": pytest.approx(150.0), "tpot_ms": None, "e2el_ms": None}
    failed = summarize([RequestTrace(0.0, error="x"), RequestTrace(1.0, error="y")], slo=Slo(ttft_s=1.0)).to_json()
    assert failed["completed"] == 0 and failed["mean_ttft_ms"] is None and failed["slo_attainment"] == 0.0
    json.dumps(failed, allow_nan=False)


# ---- goodput search -----------------------------------------------------------------------------------

SEARCH_SLO = Slo(ttft_s=0.5, tpot_s=0.05)


def _synthetic(rate: float, boundary: float = 6.0) -> list[RequestTrace]:
    """1000 requests; the fraction meeting the SLO falls linearly by 10% per request/s above boundary - 1."""
    attainment = min(1.0, max(0.0, 1.0 - (rate - (boundary - 1.0)) / 10.0))
    good = math.floor(1000 * attainment + 1e-9)
    return [_trace(i * 0.01, 0.1 if i < good else 1.0, (0.01,)) for i in range(1000)]


async def _async_synthetic(rate: float) -> list[RequestTrace]:
    return _synthetic(rate)


async def _no_traces(rate: float) -> list[RequestTrace]:
    return []


def test_goodput_search_finds_the_boundary_within_tolerance():
    calls: list[float] = []

    async def run(rate: float) -> list[RequestTrace]:
        calls.append(rate)
        return _synthetic(rate)

    result = asyncio.run(goodput_search(run, SEARCH_SLO, SearchConfig(low_rps=1.0, high_rps=20.0, tolerance_rps=0.01)))
    assert result.rate_rps is not None and 6.0 - 0.01 < result.rate_rps <= 6.0
    assert not result.saturated
    assert len(calls) <= 2 + math.ceil(math.log2(19.0 / 0.01))
    assert [p.rate_rps for p in result.probes] == calls
    passing = [p for p in result.probes if p.attainment >= 0.9]
    assert max(p.rate_rps for p in passing) == result.rate_rps
    assert all(p.rate_rps > 6.0 for p in result.probes if p.attainment < 0.9)
    assert json.loads(json.dumps(result.to_json()))["rate_rps"] == result.rate_rps


def test_goodput_search_reports_no_rate_and_saturation():
    below = asyncio.run(goodput_search(_async_synthetic, SEARCH_SLO, SearchConfig(low_rps=7.0, high_rps=9.0)))
    assert below.rate_rps is None and len(below.probes) == 1
    above = asyncio.run(goodput_search(_async_synthetic, SEARCH_SLO, SearchConfig(low_rps=1.0, high_rps=3.0)))
    assert above.rate_rps == 3.0 and above.saturated and len(above.probes) == 2


def test_goodput_search_needs_ttft_and_tpot_objectives_and_a_sane_range():
    with pytest.raises(ValueError, match="both a TTFT and a TPOT"):
        asyncio.run(goodput_search(_async_synthetic, Slo(ttft_s=0.5), SearchConfig(low_rps=1.0, high_rps=2.0)))
    with pytest.raises(ValueError, match="low_rps < high_rps"):
        SearchConfig(low_rps=2.0, high_rps=1.0)
    with pytest.raises(ValueError, match="no traces"):
        asyncio.run(goodput_search(_no_traces, SEARCH_SLO, SearchConfig(low_rps=1.0, high_rps=2.0)))
