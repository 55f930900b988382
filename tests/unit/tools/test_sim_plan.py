"""The P:D planner (`sim.plan`, `pdserve plan`): the cost model's estimate of each pool's work per request, the
climb that refines it, and the command on a small simulated cluster."""

from __future__ import annotations

import argparse
import json

import pytest

from pdserve_tools.sim.cost import CostModel
from pdserve_tools.sim.plan import Work, decode_batch, estimate, plan
from pdserve_tools.sim.plan_command import add_arguments, main
from pdserve_tools.sim.workload import WorkloadConfig
from pdserve_tools.slo import Slo

COST = CostModel(prefill_base_s=0.01, prefill_per_token_s=1e-3, prefill_per_token_sq_s=0.0, decode_base_s=0.02,
                 decode_per_seq_s=1e-3, decode_per_ctx_token_s=1e-5, kv_capacity_tokens=10_000)


def test_the_decode_batch_is_the_largest_that_keeps_the_tpot_and_fits_the_kv():
    # a sequence of 1,000 tokens costs 1 ms + 10 ms per step: (50 - 20) // 11 = 2 keep a 50 ms TPOT
    assert decode_batch(COST, 1_000, 0.05) == 2
    assert decode_batch(COST, 1_000, None) == 10  # KV alone: 10,000 // 1,000
    assert decode_batch(COST, 1_000, 10.0) == 10  # a loose TPOT: still the KV's 10
    assert decode_batch(COST, 1_000, 0.001) == 1  # nothing keeps it: one at a time


def test_the_estimate_splits_the_budget_by_each_pools_work_per_request():
    assert Work(prefill_s=1.0, decode_s=3.0, batch=4).prefill_instances(64) == 16
    assert Work(prefill_s=1.0, decode_s=0.0, batch=4).prefill_instances(64) == 63  # each pool keeps one
    assert Work(prefill_s=0.0, decode_s=1.0, batch=4).prefill_instances(64) == 1
    work = estimate(COST, WorkloadConfig(lengths=((200, 50),), prefix_groups=0), Slo(ttft_s=2.0, tpot_s=0.1))
    assert work.prefill_s == pytest.approx(0.01 + 0.2)
    # context halfway: 225 tokens; per sequence 1 ms + 2.25 ms per step: (100 - 20) // 3.25 = 24 in a batch
    assert work.batch == 24
    assert work.decode_s == pytest.approx(50 * (0.02 + 24 * 1e-3 + 24 * 225 * 1e-5) / 24)


def test_the_climb_finds_the_best_split_from_a_poor_estimate_in_few_simulations():
    asked: list[int] = []

    def goodput(prefills: int) -> float:  # prefill-bound below 16 of 64, decode-bound above
        asked.append(prefills)
        return min(3.0 * prefills, 1.0 * (64 - prefills))

    result = plan(64, 40, goodput)
    assert result.recommended == 16 and result.goodput_rps[16] == 48.0
    assert asked[:2] == [40, 32] and len(asked) == len(set(asked)) <= 16  # each split simulated once
    assert result.ratio_to_even() == pytest.approx(48.0 / 32.0)
    flat = plan(8, 3, lambda p: 5.0)
    assert flat.recommended == 1  # among equals, the fewest prefill instances
    with pytest.raises(ValueError, match="at least 2"):
        plan(1, 1, goodput)
    with pytest.raises(ValueError, match=r"\[1, 7\]"):
        plan(8, 8, goodput)


def test_pdserve_plan_recommends_the_split_with_the_most_simulated_goodput(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "plan.json"
    assert main(parser.parse_args(["--instances", "6", "--seconds", "4", "--bisect-steps", "2",
                                   "--out", str(out)])) == 0
    data = json.loads(out.read_text())
    goodputs = {int(p): g for p, g in data["goodput_rps"].items()}
    best = data["recommended"]["prefill"]
    assert data["recommended"]["decode"] == 6 - best
    assert goodputs[best] == max(goodputs.values()) > 0
    assert 3 in goodputs and data["estimate"]["prefill_instances"] in goodputs  # the even split and the estimate
    assert data["ratio_to_even"] == pytest.approx(goodputs[best] / goodputs[3])
    printed = capsys.readouterr().out
    assert f"recommended: {best} prefill, {6 - best} decode" in printed
