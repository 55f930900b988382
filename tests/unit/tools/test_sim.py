import itertools
import math

import pytest

from pdserve_tools.sim import CostModel, SimConfig, WorkloadConfig, generate, run, summarize
from router.placement.kv import ProjectedKv
from router.placement.load import LeastOutstanding, RoundRobin
from router.placement.prefix import PrefixAffinity

SMALL = SimConfig(WorkloadConfig(requests=600, rate_rps=40.0, seed=3), CostModel(kv_capacity_tokens=12_000),
                  prefill_instances=2, decode_instances=4)


def test_cost_model_step_sums_invert():
    cost = CostModel()
    total = cost.steps_s(8, 1000, 50)
    assert total == pytest.approx(sum(cost.step_s(8, 1000 + 8 * k) for k in range(50)))
    assert cost.steps_done(8, 1000, total) == 50
    assert cost.steps_done(8, 1000, total - 1e-9) == 49


def test_workload_is_deterministic_and_sorted():
    a, b = generate(WorkloadConfig(requests=200, seed=5)), generate(WorkloadConfig(requests=200, seed=5))
    assert a == b
    assert a != generate(WorkloadConfig(requests=200, seed=6))
    assert all(x.arrival <= y.arrival for x, y in itertools.pairwise(a))
    assert all(1 <= r.output_tokens <= r.max_tokens for r in a)


def test_a_length_table_gives_its_pairs_capped_and_under_the_shared_prefix():
    table = ((10, 3), (400, 5000), (9000, 20))
    config = WorkloadConfig(requests=300, lengths=table, max_tokens=2048, max_prompt_tokens=8192, prefix_tokens=128,
                            seed=2)
    requests = generate(config)
    assert requests == generate(config)
    pairs = {(r.prompt_tokens - 128 * bool(r.prefix_hashes), r.output_tokens) for r in requests}
    assert pairs == {(10, 3), (400, 2048), (8192, 20)}  # every pair drawn; output and prompt capped
    with pytest.raises(ValueError, match="both >= 1"):
        WorkloadConfig(lengths=((5, 0),))


def test_simulation_is_deterministic_with_a_seed():
    one = run(SMALL, ProjectedKv(), PrefixAffinity())
    two = run(SMALL, ProjectedKv(), PrefixAffinity())
    assert one.finished_at == two.finished_at and one.first_token_at == two.first_token_at
    assert one.preemptions == two.preemptions and one.events == two.events


@pytest.mark.parametrize("policy", [RoundRobin, ProjectedKv])
def test_every_request_finishes_exactly_once_and_kv_never_goes_negative(policy):
    result = run(SMALL, policy(), PrefixAffinity())
    assert result.rejected == 0
    assert result.finishes == [1] * len(result.requests)
    assert result.min_kv >= 0
    for req in result.requests:
        assert req.arrival <= result.first_token_at[req.rid] <= result.finished_at[req.rid]


def test_admission_rejects_once_the_hold_queue_is_full():
    config = SimConfig(SMALL.workload, SMALL.cost, 2, 1, hold_per_instance=0)
    result = run(config, ProjectedKv(), PrefixAffinity())
    served = sum(result.finishes)
    assert result.rejected > 0 and served + result.rejected == len(result.requests)
    assert all(math.isnan(result.finished_at[r.rid]) for r in result.requests if result.finishes[r.rid] == 0)


def test_admission_rejects_what_it_held_past_the_hold_timeout_and_serves_the_rest():
    workload = WorkloadConfig(requests=400, rate_rps=200.0, long_fraction=0.5, seed=2)  # far past one instance
    unbounded = SimConfig(workload, SMALL.cost, 2, 1, hold_per_instance=1_000)
    bounded = SimConfig(workload, SMALL.cost, 2, 1, hold_per_instance=1_000, hold_timeout_s=0.5)
    held_forever = run(unbounded, ProjectedKv(), PrefixAffinity())
    result = run(bounded, ProjectedKv(), PrefixAffinity())
    assert held_forever.rejected == 0 and result.rejected > 0
    assert sum(result.finishes) + result.rejected == len(result.requests)
    assert max(result.finishes) == 1
    # A request placed at all was placed within the timeout of its arrival: none waited longer to start.
    waits = [result.first_token_at[r.rid] - r.arrival for r in result.requests if result.finishes[r.rid]]
    slowest_unbounded = max(held_forever.first_token_at[r.rid] - r.arrival for r in held_forever.requests)
    assert max(waits) < slowest_unbounded


def test_length_aware_decode_beats_round_robin_on_mixed_lengths():
    workload = WorkloadConfig(requests=1500, rate_rps=60.0, long_fraction=0.2, seed=1)
    config = SimConfig(workload, CostModel(kv_capacity_tokens=24_000), prefill_instances=3, decode_instances=6)
    rr = summarize("rr", run(config, RoundRobin(), PrefixAffinity()))
    kv = summarize("kv", run(config, ProjectedKv(), PrefixAffinity()))
    assert kv.preemptions * 2 < rr.preemptions
    assert kv.tpot_p99 * 1.5 < rr.tpot_p99


def test_a_conversations_turns_extend_its_earlier_prompts_and_answers():
    config = WorkloadConfig(requests=400, rate_rps=20.0, turns=4, think_s=5.0, prefix_groups=2, seed=4)
    requests = generate(config)
    assert requests == generate(config) and len(requests) == 400
    assert [r.rid for r in requests] == list(range(400))
    assert all(x.arrival <= y.arrival for x, y in itertools.pairwise(requests))
    assert all(len(r.prefix_hashes) == r.prompt_tokens // 16 for r in requests)
    followed = 0
    for r in requests:  # a later turn holds an earlier turn's whole prompt and answer, and more
        earlier = [e for e in requests if e.arrival < r.arrival and len(e.prefix_hashes) > 8
                   and r.prefix_hashes[:len(e.prefix_hashes)] == e.prefix_hashes]
        for e in earlier:
            assert r.prompt_tokens > e.prompt_tokens + e.output_tokens
        followed += bool(earlier)
    assert followed > 150  # most turns after the first
    with pytest.raises(ValueError, match="turns >= 1"):
        WorkloadConfig(turns=0)


def test_on_conversations_prefix_affinity_computes_less_prefill_than_least_outstanding():
    config = SimConfig(WorkloadConfig(requests=600, rate_rps=20.0, turns=4, think_s=5.0, seed=3),
                       CostModel(kv_capacity_tokens=24_000), prefill_instances=4, decode_instances=4)
    aware = summarize("aware", run(config, ProjectedKv(), PrefixAffinity()))
    blind = summarize("blind", run(config, ProjectedKv(), LeastOutstanding()))
    assert aware.served == blind.served == 600
    assert aware.prefix_hit_rate > blind.prefix_hit_rate + 0.1
    assert aware.prefill_tokens < 0.9 * blind.prefill_tokens
    assert aware.ttft_p50 < blind.ttft_p50
