import pytest

from common.errors import NoInstance, Overloaded
from router.admission import BoundedQueue
from router.placement import POLICIES, InstanceSnapshot, Placement, RequestLoad, make_policy
from router.placement.kv import LeastKv, MaxTokensWeighted, ProjectedKv, projected_peak
from router.placement.prefix import PrefixAffinity, cached_tokens
from router.predictor.prediction import FixedPrediction, LengthPrediction, from_max_tokens, remaining


def load(tokens: int, p90: int, p50: int | None = None, left: int = 4096) -> RequestLoad:
    return RequestLoad(tokens, p50 if p50 is not None else p90, p90, left)


def decode(iid: str, capacity: int, *running: RequestLoad, healthy: bool = True) -> InstanceSnapshot:
    return InstanceSnapshot(iid, "decode", len(running), healthy, capacity, tuple(running))


def test_projected_peak_by_hand():
    # k steps ahead: sum(t + k) over requests with r >= k. k=5: 105 + 55 + 25 = 185; k=10: 170; k=30: 80.
    running = [load(100, 10), load(50, 30)]
    assert projected_peak(running, load(20, 5)) == 185
    assert projected_peak(running) == 170
    assert projected_peak([]) == 0
    assert projected_peak([load(7, 0)]) == 7  # about to finish: holds what it holds now


def test_length_prediction_contract():
    with pytest.raises(ValueError, match="p50 <= p90"):
        LengthPrediction(10, 5)
    assert LengthPrediction(100, 900).capped(256) == LengthPrediction(100, 256)
    assert from_max_tokens(64) == LengthPrediction(64, 64)
    assert FixedPrediction(128, 512).predict(10, 200) == LengthPrediction(128, 200)
    assert remaining(LengthPrediction(10, 20), 4, 100) == LengthPrediction(6, 16)
    assert remaining(LengthPrediction(10, 20), 30, 100) == LengthPrediction(1, 1)  # outlived both: one more
    assert remaining(LengthPrediction(10, 20), 100, 100) == LengthPrediction(0, 0)


def test_projected_kv_prefers_headroom_at_the_peak_not_now():
    # a: 1000 tokens now, finishing in 10 steps (peak 1010 + new). b: 400 now but growing 2 x 500 steps.
    a = decode("a", 3000, load(1000, 10))
    b = decode("b", 3000, load(200, 500), load(200, 500))
    new = Placement(100, 500, LengthPrediction(50, 100))
    # peaks: a = max(1000+10+100+10 at k=10, 100+100 at k=100) = 1120; b = 400+2*500 = 1400 (new adds 200 at k=100)
    assert projected_peak(a.running, load(100, 100)) == 1120
    assert ProjectedKv().pick([a, b], new) == "a"
    assert LeastKv().pick([a, b], new) == "b"  # the baseline sees only KV in use now


def test_projected_kv_filters_instances_that_would_overflow():
    new = Placement(100, 500, LengthPrediction(50, 100))
    small = decode("small", 1500, load(1000, 10))  # peak 1120 fits
    full = decode("full", 1100, load(1000, 10))  # peak 1120 > 1100
    assert ProjectedKv().pick([full, small], new) == "small"


def test_projected_kv_ties_take_turns_and_skip_unhealthy():
    snaps = [decode("a", 100), decode("b", 100), decode("c", 100, healthy=False)]
    policy = ProjectedKv()
    assert [policy.pick(snaps) for _ in range(4)] == ["a", "b", "a", "b"]
    with pytest.raises(NoInstance):
        policy.pick([decode("c", 100, healthy=False)])


def test_admission_rejects_with_resource_exhausted_and_a_retry_hint():
    full = decode("full", 1100, load(1000, 10, p50=5))
    with pytest.raises(Overloaded, match="no decode instance of 1 has KV memory") as err:
        ProjectedKv(step_s_estimate=0.02).pick([full], Placement(100, 500, LengthPrediction(50, 100)))
    assert err.value.status == "RESOURCE_EXHAUSTED"
    assert err.value.retry_after_s == pytest.approx(5 * 0.02)


def test_bounded_queue_holds_then_rejects_and_drains_in_order():
    queue: BoundedQueue[int] = BoundedQueue(2, retry_after_s=0.5)
    queue.offer(1)
    queue.offer(2)
    with pytest.raises(Overloaded, match="2 requests already wait") as err:
        queue.offer(3)
    assert err.value.status == "RESOURCE_EXHAUSTED" and err.value.retry_after_s == 0.5
    assert queue.drain(lambda item: item < 2) == [1]  # stops at the first that does not fit
    assert len(queue) == 1


def test_bounded_queue_expires_its_oldest_items_only_while_they_are_past_the_deadline():
    queue: BoundedQueue[int] = BoundedQueue(5)
    for arrival in (1, 2, 9, 3):
        queue.offer(arrival)
    assert queue.expire(lambda arrival: arrival < 5) == [1, 2]  # stops at 9, though 3 behind it is older
    assert len(queue) == 2 and queue.expire(lambda arrival: arrival < 5) == []
    assert queue.drain(lambda _: True) == [9, 3]


def test_max_tokens_weighted_counts_the_reservation():
    a = decode("a", 0, load(100, 10, left=2000))
    b = decode("b", 0, load(300, 10, left=100))
    assert MaxTokensWeighted().pick([a, b]) == "b"
    assert LeastKv().pick([a, b]) == "a"


def test_prefix_affinity_trades_cache_hits_against_queued_work():
    placement = Placement(100, 10, prefix_hashes=(11, 22, 33), block_tokens=16)
    assert cached_tokens(placement, frozenset({11, 22})) == 32
    assert cached_tokens(placement, frozenset({22, 33})) == 0  # a chain: a miss at block 0 ends the match
    warm = InstanceSnapshot("warm", "prefill", 1, queued_prefill_tokens=20, cached_prefixes=frozenset({11, 22, 33}))
    cold = InstanceSnapshot("cold", "prefill", 0, queued_prefill_tokens=0)
    assert PrefixAffinity().pick([warm, cold], placement) == "warm"  # 20 + 52 < 0 + 100
    busy = InstanceSnapshot("warm", "prefill", 9, queued_prefill_tokens=60, cached_prefixes=frozenset({11, 22, 33}))
    assert PrefixAffinity().pick([busy, cold], placement) == "cold"  # 60 + 52 > 100


@pytest.mark.parametrize("name", ["projected_kv", "least_kv", "max_tokens_weighted", "prefix_affinity"])
def test_new_policies_are_registered_and_work_without_a_placement(name):
    assert name in POLICIES
    policy = make_policy(name)
    assert policy.name == name
    assert policy.pick([InstanceSnapshot("i0", "decode", 0)]) == "i0"
