import pytest

from common.histogram import Tally
from common.loop_lag import LAG_BUCKETS
from router.metrics import RouterMetrics
from router.timings import PhaseTimings


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


def test_pool_gauges_are_read_from_the_registry_at_scrape_time():
    from router.registry import Instance
    from worker.engine import EngineInfo, EngineStats

    info = EngineInfo(max_model_len=1024, block_size=16, num_blocks=64)
    decode = Instance("decode-0", "decode", None, info, None, outstanding=3)
    prefill = Instance("prefill-0", "prefill", None, info, None, healthy=False)
    waiting = [0]
    m = RouterMetrics()
    m.watch_pool(lambda: [prefill, decode], lambda: waiting[0])
    assert value(m, "pdserve_instance_healthy", instance="decode-0", role="decode") == 1
    assert value(m, "pdserve_instance_healthy", instance="prefill-0", role="prefill") == 0
    assert value(m, "pdserve_instance_outstanding_requests", instance="decode-0", role="decode") == 3
    # No heartbeat yet: no engine gauges rather than a made-up 0.
    assert m.registry.get_sample_value("pdserve_instance_kv_cache_usage_ratio", {"instance": "decode-0",
                                                                                 "role": "decode"}) is None
    decode.stats = EngineStats(running=2, waiting=5, kv_cache_usage=0.25)
    waiting[0] = 7
    assert value(m, "pdserve_instance_kv_cache_usage_ratio", instance="decode-0", role="decode") == 0.25
    assert value(m, "pdserve_instance_waiting_requests", instance="decode-0", role="decode") == 5
    assert value(m, "pdserve_admission_waiting_requests") == 7
    # The worker actor's loop lag, as its heartbeat carried it: a histogram per instance.
    tally = Tally(LAG_BUCKETS)
    for seconds in (0.0005, 0.02, 3.0):
        tally.observe(seconds)
    decode.stats = EngineStats(loop_lag=tally.histogram())
    lag = {"instance": "decode-0", "role": "decode"}
    assert value(m, "pdserve_worker_event_loop_lag_seconds_bucket", le="0.001", **lag) == 1
    assert value(m, "pdserve_worker_event_loop_lag_seconds_bucket", le="0.025", **lag) == 2
    assert value(m, "pdserve_worker_event_loop_lag_seconds_bucket", le="+Inf", **lag) == 3
    assert value(m, "pdserve_worker_event_loop_lag_seconds_sum", **lag) == 3.0205
    # No step-time histogram where the heartbeat carried none.
    assert m.registry.get_sample_value("pdserve_engine_step_seconds_count", lag) is None


def test_each_instances_engine_step_times_are_exported_as_a_histogram_with_the_bounds_they_were_kept_in():
    from router.registry import Instance
    from worker.engine import EngineInfo, EngineStats
    from worker.steps import STEP_BUCKETS

    info = EngineInfo(max_model_len=1024, block_size=16, num_blocks=64)
    prefill = Instance("prefill-0", "prefill", None, info, None)
    decode = Instance("decode-0", "decode", None, info, None)
    m = RouterMetrics()
    m.watch_pool(lambda: [prefill, decode], lambda: 0)
    steps = Tally(STEP_BUCKETS)
    for seconds in (0.004, 0.03, 0.03, 1.2, 12.0):
        steps.observe(seconds)
    prefill.stats = EngineStats(step_time=steps.histogram())
    decode.stats = EngineStats(step_time=Tally(STEP_BUCKETS).histogram())
    p = {"instance": "prefill-0", "role": "prefill"}
    assert value(m, "pdserve_engine_step_seconds_bucket", le="0.001", **p) == 0
    assert value(m, "pdserve_engine_step_seconds_bucket", le="0.005", **p) == 1
    assert value(m, "pdserve_engine_step_seconds_bucket", le="0.05", **p) == 3
    assert value(m, "pdserve_engine_step_seconds_bucket", le="2.5", **p) == 4
    assert value(m, "pdserve_engine_step_seconds_bucket", le="10.0", **p) == 4
    assert value(m, "pdserve_engine_step_seconds_bucket", le="+Inf", **p) == 5
    assert value(m, "pdserve_engine_step_seconds_count", **p) == 5
    assert value(m, "pdserve_engine_step_seconds_sum", **p) == pytest.approx(13.264)
    # An engine that has not stepped yet exports an empty histogram, not a missing one.
    d = {"instance": "decode-0", "role": "decode"}
    assert m.registry.get_sample_value("pdserve_engine_step_seconds_count", d) == 0
