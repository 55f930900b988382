import pytest

from pdserve.router.metrics import RouterMetrics
from pdserve.router.timings import PhaseTimings


def value(metrics: RouterMetrics, name: str, **labels: str) -> float:
    v = metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def test_a_finished_request_is_counted_once_with_its_latencies():
    m = RouterMetrics()
    m.finished("stop", 10, 5, PhaseTimings(prefill_compute=0.2, time_to_first_token=0.3, end_to_end=0.7))
    assert value(m, "pdserve_requests_total", outcome="stop") == 1
    assert value(m, "pdserve_prompt_tokens_total") == 10
    assert value(m, "pdserve_generation_tokens_total") == 5
    assert value(m, "pdserve_time_per_output_token_seconds_sum") == pytest.approx(0.1)
    assert value(m, "pdserve_e2e_request_latency_seconds_sum") == pytest.approx(0.7)
    assert value(m, "pdserve_request_phase_seconds_sum", phase="prefill_compute") == pytest.approx(0.2)
    assert value(m, "pdserve_request_phase_seconds_count", phase="kv_transfer") == 1


def test_one_token_requests_have_no_tpot_and_early_ends_count_by_status():
    m = RouterMetrics()
    m.finished("length", 3, 1, PhaseTimings(time_to_first_token=0.1, end_to_end=0.1))
    m.ended_early("DEADLINE_EXCEEDED")
    m.ended_early("cancelled")
    assert value(m, "pdserve_time_per_output_token_seconds_count") == 0
    assert value(m, "pdserve_requests_total", outcome="DEADLINE_EXCEEDED") == 1
    assert value(m, "pdserve_requests_total", outcome="cancelled") == 1


def test_registries_are_independent():
    a, b = RouterMetrics(), RouterMetrics()
    a.ended_early("cancelled")
    assert value(b, "pdserve_requests_total", outcome="cancelled") == 0
