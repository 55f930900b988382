"""Cost model files: the JSON round trip, and `pdserve sim --cost` running on the file's coefficients."""

import dataclasses
import json

import pytest

from pdserve.cli import build_parser
from pdserve_tools.sim.command import main
from pdserve_tools.sim.compare import Scenario, goodput, run_policy
from pdserve_tools.sim.cost import CostModel
from pdserve_tools.slo import Slo

# Every engine time four times the placeholder's: a slower machine, same cluster.
SLOW = CostModel(prefill_base_s=0.016, prefill_per_token_s=2.0e-4, prefill_per_token_sq_s=8.0e-9, decode_base_s=0.032,
                 decode_per_seq_s=8.0e-5, decode_per_ctx_token_s=2.6e-7, transfer_per_token_s=2.0e-5,
                 kv_capacity_tokens=90_000)


def test_a_cost_model_round_trips_through_its_json():
    assert CostModel.from_json(SLOW.to_json()) == SLOW
    assert CostModel.from_json(CostModel().to_json()) == CostModel()
    # a calibration file carries more than the cost object: the rest is ignored
    document = {"model": "m", "prefill_points": [{"tokens": 16, "seconds": 0.01}], **json.loads(SLOW.to_json())}
    assert CostModel.from_json(json.dumps(document)) == SLOW


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c.pop("decode_base_s"), "missing: \\['decode_base_s'\\]"),
    (lambda c: c.update(decode_base=0.01), "unknown: \\['decode_base'\\]"),
    (lambda c: c.update(kv_capacity_tokens=1.5), "whole number"),
    (lambda c: c.update(prefill_base_s="fast"), "must be numbers"),
    (lambda c: c.update(prefill_base_s=float("inf")), "finite"),
    (lambda c: c.update(decode_per_seq_s=-1.0), ">= 0"),
])
def test_a_bad_cost_object_is_refused_with_what_is_wrong(change, message):
    document = json.loads(SLOW.to_json())
    change(document["cost"])
    with pytest.raises(ValueError, match=message):
        CostModel.from_json(json.dumps(document))
    with pytest.raises(ValueError, match='"cost" object'):
        CostModel.from_json(json.dumps(document["cost"]))  # the bare fields, not a cost file


def test_a_scenario_runs_on_its_cost_model_with_its_own_kv_capacity():
    default, slow = Scenario(2, seconds=3.0), Scenario(2, seconds=3.0, cost=SLOW)
    assert default.config(10.0).cost == CostModel(kv_capacity_tokens=24_000)  # unchanged without a cost model
    assert slow.config(10.0).cost == dataclasses.replace(SLOW, kv_capacity_tokens=24_000)
    fast_run, slow_run = run_policy(default, "round_robin", 10.0), run_policy(slow, "round_robin", 10.0)
    assert slow_run.ttft_p50 > 2 * fast_run.ttft_p50 and slow_run.tpot_p50 > 2 * fast_run.tpot_p50


def test_a_slower_cost_model_finds_a_lower_goodput():
    slo = Slo(ttft_s=2.0, tpot_s=0.05)
    fast = goodput(Scenario(1, seconds=3.0, slo=slo), "round_robin", 8.0, bisect_steps=2)
    slow = goodput(Scenario(1, seconds=3.0, slo=slo, cost=SLOW), "round_robin", 8.0, bisect_steps=2)
    assert 0 < slow.goodput_rps < fast.goodput_rps


def run_sim(tmp_path, *flags):
    out = tmp_path / "sim.json"
    args = build_parser().parse_args(["sim", "--instances", "1", "--policy", "round_robin", "--rate", "10",
                                      "--requests", "40", "--out", str(out), *flags])
    assert main(args) == 0
    return json.loads(out.read_text())


def test_pdserve_sim_cost_runs_on_the_file(tmp_path):
    cost_file = tmp_path / "cost.json"
    cost_file.write_text(SLOW.to_json())
    default, calibrated = run_sim(tmp_path), run_sim(tmp_path, "--cost", str(cost_file))
    assert default["cost_file"] is None and default["cost"] == dataclasses.asdict(CostModel(kv_capacity_tokens=24_000))
    assert calibrated["cost_file"] == str(cost_file)
    assert calibrated["cost"] == dataclasses.asdict(dataclasses.replace(SLOW, kv_capacity_tokens=24_000))
    (fast,), (slow,) = default["runs"], calibrated["runs"]
    assert slow["ttft_p50"] > 2 * fast["ttft_p50"] and slow["tpot_p50"] > 2 * fast["tpot_p50"]
    # --cost-kv: the file's KV capacity per decode instance instead of the scenario's
    assert run_sim(tmp_path, "--cost", str(cost_file), "--cost-kv")["cost"] == dataclasses.asdict(SLOW)


def test_pdserve_sim_refuses_a_bad_cost_file_and_cost_kv_alone(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"cost": {"decode_base_s": 0.01}}')
    with pytest.raises(SystemExit, match="cannot use .*bad.json as a cost model: cost model fields missing"):
        run_sim(tmp_path, "--cost", str(bad))
    with pytest.raises(SystemExit, match="cannot use .*absent.json"):
        run_sim(tmp_path, "--cost", str(tmp_path / "absent.json"))
    with pytest.raises(SystemExit, match="--cost-kv"):
        run_sim(tmp_path, "--cost-kv")
