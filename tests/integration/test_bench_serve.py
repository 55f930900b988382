"""`pdserve bench serve` end to end on the tiny model: three pdserve targets (1P1D, colocated, and 1P2D placing
decodes by projected KV), a finite rate and `inf` (every request at once, under a concurrency cap).

Every request completes at every rate on every target; the JSON holds each target at each rate with its
engines' preemption count (none at this load), the printed report has a row per target and rate with its
completed and failed counts, and the latency CDFs are PNG files.
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
