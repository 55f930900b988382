import pytest

from common.errors import NoInstance
from router.placement import InstanceSnapshot, RequestLoad, make_policy
from router.placement.load import LeastOutstanding, RoundRobin


def snaps(*loads: int, unhealthy: tuple[int, ...] = ()) -> list[InstanceSnapshot]:
    return [InstanceSnapshot(f"i{n}", "colocated", load, n not in unhealthy) for n, load in enumerate(loads)]


def test_round_robin_visits_each_instance_in_turn():
    policy = RoundRobin()
    assert [policy.pick(snaps(0, 0, 0)) for _ in range(7)] == ["i0", "i1", "i2", "i0", "i1", "i2", "i0"]


def test_round_robin_skips_unhealthy_instances():
    policy = RoundRobin()
    assert {policy.pick(snaps(0, 0, 0, unhealthy=(1,))) for _ in range(10)} == {"i0", "i2"}


def test_least_outstanding_picks_the_least_loaded():
    assert LeastOutstanding().pick(snaps(3, 1, 2)) == "i1"


def test_least_outstanding_spreads_ties():
    policy = LeastOutstanding()
    picks = [policy.pick(snaps(5, 2, 2, 2)) for _ in range(6)]
    assert picks == ["i1", "i2", "i3", "i1", "i2", "i3"]


def test_least_outstanding_ignores_unhealthy_even_if_idle():
    assert LeastOutstanding().pick(snaps(0, 4, unhealthy=(0,))) == "i1"


@pytest.mark.parametrize("policy", [RoundRobin(), LeastOutstanding()])
def test_no_healthy_instance_is_unavailable(policy):
    with pytest.raises(NoInstance, match="no healthy instance among 2"):
        policy.pick(snaps(0, 0, unhealthy=(0, 1)))
    with pytest.raises(NoInstance):
        policy.pick([])


def test_make_policy_names():
    assert make_policy("round_robin").name == "round_robin"
    with pytest.raises(ValueError, match="unknown policy 'fastest'"):
        make_policy("fastest")


def test_a_held_request_counts_its_kv_so_far_and_what_its_prediction_leaves():
    from router.predictor.prediction import LengthPrediction
    from router.registry import Held

    held = Held(context_tokens=100, max_tokens=50, prediction=LengthPrediction(20, 40))
    assert held.load() == RequestLoad(100, 20, 40, 50)
    held.generated = 30  # past its p50, short of its p90
    assert held.load() == RequestLoad(130, 1, 10, 20)
    held.generated = 45  # past both: one more token at least, never past max_tokens
    assert held.load() == RequestLoad(145, 1, 1, 5)
