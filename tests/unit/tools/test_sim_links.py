"""The simulator's nodes: a KV transfer between two nodes costs the request's KV over the link, one within a node the
cost model's in-node time; `pdserve sim --nodes --link-gbit` runs on them."""

import json

import pytest

from pdserve.cli import build_parser
from pdserve_tools.sim import CostModel, Links, SimConfig, WorkloadConfig, run
from pdserve_tools.sim.command import main
from router.placement.load import RoundRobin
from router.placement.prefix import PrefixAffinity

COST = CostModel(transfer_per_token_s=1e-6)


def test_a_transfer_within_a_node_costs_the_in_node_time_and_across_nodes_the_link():
    links = Links(nodes=2, link_gbit=10.0, kv_bytes_per_token=1000)
    # prefill 0, decode 0 and decode 2 on node 0; decode 1 on node 1
    assert links.transfer_s(COST, 500, prefill=0, decode=0) == pytest.approx(500 * 1e-6)
    assert links.transfer_s(COST, 500, prefill=0, decode=2) == pytest.approx(500 * 1e-6)
    assert links.transfer_s(COST, 500, prefill=0, decode=1) == pytest.approx(500 * 8000 / 10e9)
    assert Links().transfer_s(COST, 500, prefill=0, decode=1) == pytest.approx(500 * 1e-6)  # one node: in-node
    with pytest.raises(ValueError, match="link_gbit > 0"):
        Links(nodes=2, link_gbit=0.0)
    with pytest.raises(ValueError, match="nodes >= 1"):
        Links(nodes=0)


def test_requests_decoded_on_another_node_land_later_by_exactly_the_link_time():
    # Requests far apart (nothing queues); one prefill instance on node 0, decodes alternate between nodes 0 and 1.
    workload = WorkloadConfig(requests=20, rate_rps=0.01, seed=4)
    one_node = SimConfig(workload, COST, prefill_instances=1, decode_instances=2)
    slow = Links(nodes=2, link_gbit=0.1, kv_bytes_per_token=10_000)
    two_nodes = SimConfig(workload, COST, prefill_instances=1, decode_instances=2, links=slow)
    a = run(one_node, RoundRobin(), PrefixAffinity())
    b = run(two_nodes, RoundRobin(), PrefixAffinity())
    assert a.first_token_at == b.first_token_at  # prefill does not care where the decode runs
    extra_per_token = slow.link_per_token_s - COST.transfer_per_token_s
    crossed = 0
    for req, done_a, done_b in zip(a.requests, a.finished_at, b.finished_at, strict=True):
        late = done_b - done_a
        if late > 1e-9:
            crossed += 1
            assert late == pytest.approx(extra_per_token * req.prompt_tokens)
        else:
            assert late == pytest.approx(0.0, abs=1e-9)
    assert 0 < crossed < len(a.requests)


def test_sim_command_takes_nodes_and_a_link(tmp_path):
    out = tmp_path / "sim.json"
    args = build_parser().parse_args(["sim", "--instances", "4", "--policy", "round_robin", "--rate", "20",
                                      "--requests", "200", "--nodes", "2", "--link-gbit", "25",
                                      "--out", str(out)])
    assert main(args) == 0
    assert json.loads(out.read_text())["links"] == {"nodes": 2, "link_gbit": 25.0, "kv_bytes_per_token": 131_072}
    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps({"cost": json.loads(CostModel().to_json())["cost"],
                                "transfer": {"kv_bytes_per_token": 46_080}}))
    args = build_parser().parse_args(["sim", "--instances", "4", "--policy", "round_robin", "--rate", "20",
                                      "--requests", "200", "--nodes", "2", "--cost", str(cost), "--out", str(out)])
    assert main(args) == 0
    assert json.loads(out.read_text())["links"]["kv_bytes_per_token"] == 46_080
