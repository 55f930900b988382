import json

import pytest

from pdserve.cli import build_parser
from pdserve_tools.sim.command import main
from pdserve_tools.sim.goodput import highest_passing


def threshold(limit: float, calls: list[float]):
    def passes(rate: float) -> bool:
        calls.append(rate)
        return rate <= limit

    return passes


@pytest.mark.parametrize("start", [1.0, 10.0, 37.0, 300.0])
def test_search_finds_a_known_threshold_within_the_bisection_resolution(start):
    calls: list[float] = []
    found = highest_passing(threshold(37.3, calls), start, bisect_steps=6)
    assert found <= 37.3
    lo_hi_gap = max(start, 37.3)  # the bracket [lo, 2 lo] (or [hi / 2, hi]) is never wider than this
    assert 37.3 - found <= lo_hi_gap / 2**6
    assert found in calls and all(c <= 37.3 for c in calls if c <= found)


def test_search_stops_doubling_at_the_cap_and_reports_zero_when_nothing_passes():
    assert highest_passing(lambda rate: True, 1.0, bisect_steps=2, max_doublings=3) == 8.0
    assert highest_passing(lambda rate: False, 1.0, max_doublings=3) == 0.0
    with pytest.raises(ValueError):
        highest_passing(lambda rate: True, 0.0)


def test_search_counts_its_runs():
    calls: list[float] = []
    highest_passing(threshold(50.0, calls), 20.0, bisect_steps=3)
    assert calls == [20.0, 40.0, 80.0, 60.0, 50.0, 55.0]


def test_pdserve_sim_writes_a_goodput_table_and_json(tmp_path, capsys):
    out = tmp_path / "sim.json"
    args = build_parser().parse_args(["sim", "--instances", "1", "--policy", "round_robin", "projected_kv",
                                      "--seconds", "3", "--bisect-steps", "1", "--out", str(out)])
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert [r["policy"] for r in data["results"]] == ["round_robin", "projected_kv"]
    assert all(r["goodput_rps"] > 0 and r["at"]["slo_attainment"] >= 0.9 for r in data["results"])
    assert "projected_kv" in capsys.readouterr().out


def test_pdserve_sim_single_run_at_a_rate(tmp_path):
    out = tmp_path / "one.json"
    args = build_parser().parse_args(["sim", "--instances", "2", "--policy", "least_kv", "--rate", "20",
                                      "--requests", "50", "--out", str(out)])
    assert main(args) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert run["served"] + run["rejected"] == 50
