"""Length-aware placement live: `projected_kv` on one colocated instance of the tiny model with KV for 19 blocks.

The instance's KV capacity (19 blocks of 128 tokens: 2,432 tokens) holds two requests of a 100-token prompt and
900 output tokens (1,000 tokens each at their peak) but not three. With no predictor every request is taken to
run to its max_tokens, so the router runs two at once, holds the third until one ends, and refuses a fourth
(`router.hold_queue: 1`) with RESOURCE_EXHAUSTED and a retry hint. With `least_outstanding` instead, three such
requests all go to the engine, which runs out of KV blocks and preempts (counted in the router's instance
metrics). With a predictor, a finished request's length is compared with its prediction in the Prometheus metrics.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pdserve_client import Client
from pdserve_client.errors import ResourceExhausted
from router.placement import make_policy
from router.predictor.prediction import FixedPrediction
from tests.conftest import TINY_ENGINE, start_deployment, stop_deployment
from tests.integration.test_prometheus import scraped_now

pytestmark = pytest.mark.integration

BLOCKS = 19
PROMPT = 100
MAX_TOKENS = 900


@pytest.fixture(scope="module")
def dep(tiny_model):
    kv_bytes = BLOCKS * 128 * 1024  # 128-token blocks of 2 layers x 1 KV head x 64 dims x (K, V) x 4 bytes
    d = start_deployment(
        tiny_model,
        {"mode": "colocated", "colocated": {"instances": 1}},
        engine={"model": str(tiny_model), **TINY_ENGINE, "kv_cache_gib": (kv_bytes + 512) / 2**30},
        router={"policy": "projected_kv", "hold_queue": 1, "max_tokens_limit": MAX_TOKENS},
    )
    yield d
    stop_deployment(d)


def run_streams(dep, count: int) -> list[tuple[float, float] | ResourceExhausted]:
    """`count` requests sent at once; per request (first token time, last token time) or the refusal."""
    go = threading.Barrier(count)

    def one(i: int) -> tuple[float, float] | ResourceExhausted:
        prompt = [1000 + i] * PROMPT
        with Client(dep.target) as client:
            go.wait()
            try:
                stamps = [time.monotonic() for chunk in client.generate(
                    prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, timeout=300) if chunk.token_ids]
            except ResourceExhausted as e:
                return e
        return stamps[0], stamps[-1]

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most spans (first token to last) that overlap at one moment."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    at_once = most = 0
    for _, step in events:
        at_once += step
        most = max(most, at_once)
    return most


def test_the_instance_runs_what_its_kv_holds_holds_one_more_and_refuses_the_next(dep):
    (instance,) = dep.router.registry.all()
    assert instance.kv_capacity_tokens == BLOCKS * 128
    results = run_streams(dep, 4)
    refused = [r for r in results if isinstance(r, ResourceExhausted)]
    assert len(refused) == 1, results
    assert "KV memory" in refused[0].message and refused[0].retry_after_s is not None
    spans = [r for r in results if not isinstance(r, ResourceExhausted)]
    assert len(spans) == 3
    assert most_at_once(spans) == 2  # the held request began once one of the first two had ended
    assert instance.held == {} and scraped_now(dep)["pdserve_requests_held"] == 0


def preemptions_past(instance, count: int, within_s: float = 30.0) -> int:
    """The engine's preemption count once a heartbeat has brought one above `count` (or as it stands at the end)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if instance.stats is not None and instance.stats.preemptions > count:
            break
        time.sleep(0.1)  # polling the heartbeat-fed stats, bounded by the deadline
    return instance.stats.preemptions if instance.stats is not None else 0


def test_least_outstanding_overfills_the_kv_and_the_engine_preempts(dep):
    (instance,) = dep.router.registry.all()
    before = instance.stats.preemptions if instance.stats is not None else 0
    dep.router.policy = make_policy("least_outstanding")
    try:
        results = run_streams(dep, 3)
    finally:
        dep.router.policy = make_policy("projected_kv")
    spans = [r for r in results if not isinstance(r, ResourceExhausted)]
    assert len(spans) == 3 and most_at_once(spans) == 3
    preempted = preemptions_past(instance, before)
    assert preempted > before
    labels = f'instance="{instance.instance_id}",role="{instance.role}"'
    assert scraped_now(dep)[f"pdserve_instance_preemptions_total{{{labels}}}"] == preempted


def test_finished_requests_are_scored_against_their_prediction(dep):
    before = scraped_now(dep)
    dep.router.predictor = FixedPrediction(p50=MAX_TOKENS // 2, p90=MAX_TOKENS)
    try:
        results = run_streams(dep, 2)
    finally:
        dep.router.predictor = None
    assert all(not isinstance(r, ResourceExhausted) for r in results)
    after = scraped_now(dep)

    def added(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert added("pdserve_output_length_error_tokens_count") == 2
    assert added("pdserve_output_length_error_tokens_sum") == 2 * (MAX_TOKENS - MAX_TOKENS // 2)
    assert added('pdserve_output_length_within_prediction_total{quantile="p50",result="beyond"}') == 2
    assert added('pdserve_output_length_within_prediction_total{quantile="p90",result="within"}') == 2
    assert added("pdserve_output_length_relative_error_count") == 2
