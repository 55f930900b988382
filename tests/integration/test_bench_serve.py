"""`pdserve bench serve` end to end on the tiny model: three pdserve targets (1P1D, colocated, and 1P2D placing
decodes by projected KV), a finite rate and `inf` (every request at once, under a concurrency cap).

Every request completes at every rate on every target; the JSON holds each target at each rate with its
engines' preemption count (none at this load), the printed report has a row per target and rate with its
completed and failed counts, and the latency CDFs are PNG files. Then `pdserve bench goodput`, on one target.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from pdserve.cli import main
from tests.conftest import TINY_ENGINE

pytestmark = pytest.mark.integration

TARGETS = ["pdserve-disagg", "pdserve-colocated", "pdserve-1p2d-projected"]
REQUESTS = 6
PNG = b"\x89PNG\r\n\x1a\n"


def test_bench_serve_runs_the_pdserve_targets_at_two_rates(tiny_model, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"engine": {"model": str(tiny_model), **TINY_ENGINE},
                                      "router": {"max_tokens_limit": 512}}))
    out = tmp_path / "serve.json"
    code = main(["bench", "serve", "--config", str(config), "--targets", *TARGETS, "--requests", str(REQUESTS),
                 "--dataset", "random", "--input-len", "48", "--output-len", "8", "--range-ratio", "0.5",
                 "--rate", "4", "inf", "--max-concurrency", "3", "--timeout", "120", "--out", str(out)])
    assert code == 0

    data = json.loads(out.read_text())
    assert data["reference"] == "pdserve-disagg"
    assert sorted(data["results"]) == sorted(TARGETS)
    for target in TARGETS:
        assert sorted(data["results"][target]) == ["4", "inf"]
        for run in data["results"][target].values():
            assert (run["completed"], run["failed"]) == (REQUESTS, 0), run["errors"]
            assert len(run["ttfts_ms"]) == REQUESTS and run["total_output_tokens"] > 0
            assert run["preemptions"] == 0 and run["median_ttft_ms"] > 0

    plots = sorted(p.name for p in tmp_path.glob("*.png"))
    assert plots == ["serve-cdf-4.png", "serve-cdf-inf.png"]  # one finite rate: no rate plot
    assert all((tmp_path / name).read_bytes().startswith(PNG) for name in plots)

    printed = capsys.readouterr().out
    assert "== 4 req/s ==" in printed and "== inf req/s ==" in printed
    for target in TARGETS:
        assert printed.count(target) >= 4  # in both tables at both rates
        assert len(re.findall(rf"{target} +{REQUESTS} +0 ", printed)) == 2, printed  # completed, failed


def test_bench_goodput_reads_every_slo_from_one_climb_per_seed(tiny_model, tmp_path, capsys):
    """One target, two seeds, two rates, an SLO nothing meets and one everything meets: both rates run for both
    seeds (the easy SLO never misses), the impossible SLO's goodput lies below the range and the easy one's is the
    highest rate, saturated; the JSON, the table and the attainment plot say so."""
    pytest.importorskip("matplotlib")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"engine": {"model": str(tiny_model), **TINY_ENGINE},
                                      "router": {"max_tokens_limit": 512}}))
    out = tmp_path / "goodput.json"
    code = main(["bench", "goodput", "--config", str(config), "--targets", "pdserve-disagg", "--requests", "4",
                 "--dataset", "random", "--input-len", "32", "--output-len", "4", "--rates", "4", "2",
                 "--seeds", "0", "1", "--min-duration-s", "0", "--slo", "never:1:1", "--slo", "easy:600000:600000",
                 "--timeout", "120", "--out", str(out)])
    assert code == 0

    data = json.loads(out.read_text())
    assert [s["name"] for s in data["slos"]] == ["never", "easy"]
    never, easy = data["slos"]
    assert never["slo"] == {"ttft_ms": 1.0, "tpot_ms": 1.0}
    assert never["rates"] == {"pdserve-disagg": None} and easy["rates"] == {"pdserve-disagg": 4.0}
    assert easy["saturated"] == {"pdserve-disagg": True}
    assert len(easy["per_seed"]["pdserve-disagg"]) == 2
    for seed in ("0", "1"):
        runs = data["runs"]["pdserve-disagg"][seed]
        assert [r["rate_rps"] for r in runs] == ["2", "4"]
        for run in runs:
            assert (run["completed"], run["failed"]) == (4, 0)
            assert run["attainment"] == {"never": 0.0, "easy": 1.0}
    assert (tmp_path / "goodput-attainment.png").read_bytes().startswith(PNG)

    printed = capsys.readouterr().out
    assert "== never: TTFT <= 1 ms, TPOT <= 1 ms ==" in printed
    assert re.search(r"pdserve-disagg +below +below below ", printed), printed
    assert re.search(r"pdserve-disagg +4\.000\+ +4\.000\+ 4\.000\+ ", printed), printed
