"""`pdserve calibrate` on the tiny model with few points: the file it writes loads as a cost model and holds
every point asked for; `pdserve sim --cost` runs on it.

The calibration runs as its own process: it binds the whole process to its cores and runs the engine in it,
which must not happen to the test process that later tests share.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from pdserve.cli import main as cli
from pdserve_tools.sim.cost import CostModel

pytestmark = pytest.mark.integration

PREFILL_TOKENS, REPEATS = [16, 64, 256], 2
BATCHES, CONTEXTS, STEPS = [1, 4], [16, 64], 3


def test_calibrate_writes_a_loadable_cost_file_with_every_point(tiny_model, tmp_path):
    out = tmp_path / "cost.json"
    # The last core: engines bind from core 0 up (the cluster's instance 0, the other tests' engines), so that one
    # is the likeliest to be busy, and a calibration on a busy core runs many times slower.
    core = str(max(os.sched_getaffinity(0)))
    run = subprocess.run(
        [sys.executable, "-m", "pdserve.cli", "calibrate", "--model", str(tiny_model), "--out", str(out),
         "--prefill-tokens", *map(str, PREFILL_TOKENS), "--repeats", str(REPEATS), "--batches", *map(str, BATCHES),
         "--contexts", *map(str, CONTEXTS), "--decode-steps", str(STEPS), "--kv-cache-gib", "0.25", "--cores", core],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "prefill (R^2" in run.stdout and "decode step (R^2" in run.stdout
    assert "calibrating: 100%" in run.stderr  # the progress bar ran over every point

    cost = CostModel.from_json(out.read_text())
    values = [getattr(cost, f) for f in ("prefill_base_s", "prefill_per_token_s", "prefill_per_token_sq_s",
                                         "decode_base_s", "decode_per_seq_s", "decode_per_ctx_token_s",
                                         "transfer_per_token_s")]
    assert all(math.isfinite(v) and v >= 0 for v in values) and cost.decode_base_s > 0
    doc = json.loads(out.read_text())
    assert doc["model"] == tiny_model.name and doc["threads"] == 1 and doc["cores"] == core and doc["date"]
    # the tiny model's KV: 2 layers x (K, V) x 1 head x 64 x 4 bytes per token, all 0.25 GiB of it
    assert doc["transfer"]["kv_bytes_per_token"] == pytest.approx(1024, rel=0.01)
    assert cost.kv_capacity_tokens == doc["kv"]["capacity_tokens"] == pytest.approx(2**28 / 1024, rel=0.01)
    assert [p["tokens"] for p in doc["prefill_points"]] == PREFILL_TOKENS
    assert all(len(p["repeats_s"]) == REPEATS and p["seconds"] > 0 for p in doc["prefill_points"])
    assert [(p["batch"], p["context_per_seq"]) for p in doc["decode_points"]] == [
        (b, c) for b in BATCHES for c in CONTEXTS]
    for p in doc["decode_points"]:
        assert len(p["steps"]) == STEPS and all(s["seconds"] > 0 for s in p["steps"])
        # the first timed step: every sequence holds its prompt and its first token
        assert p["steps"][0]["context_tokens"] >= p["batch"] * (p["context_per_seq"] + 1)
        assert [s["context_tokens"] for s in p["steps"]] == [
            p["steps"][0]["context_tokens"] + k * p["batch"] for k in range(STEPS)]
    for phase in ("prefill", "decode"):
        fit = doc["fit"][phase]
        assert math.isfinite(fit["r2"]) and fit["r2"] <= 1 and min(fit["coefficients"]) >= 0

    sim = tmp_path / "sim.json"
    assert cli(["sim", "--instances", "1", "--policy", "round_robin", "--rate", "2", "--requests", "20",
                "--cost", str(out), "--out", str(sim)]) == 0
    ran = json.loads(sim.read_text())
    assert ran["cost"]["decode_base_s"] == cost.decode_base_s and ran["runs"][0]["served"] == 20
