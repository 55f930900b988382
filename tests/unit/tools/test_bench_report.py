import json

import pytest

from pdserve_tools.bench.overhead import summarize
from pdserve_tools.bench.report import table, write_json


def test_overhead_is_paired_per_request():
    # (ttft, e2e) per request; the candidate is slower by 10 ms, 2 ms of it at the first token.
    base = [(0.010, 0.100), (0.020, 0.200), (0.015, 0.150)]
    cand = [(0.012, 0.110), (0.022, 0.210), (0.017, 0.160)]
    result = summarize({"baseline": base, "candidate": cand}, max_tokens=5)
    assert result["overhead_p50_s"] == pytest.approx(0.010)
    assert result["ttft_overhead_p50_s"] == pytest.approx(0.002)
    assert result["per_token_overhead_p50_s"] == pytest.approx(0.002)
    assert result["ratio_e2e_p50"] == pytest.approx(0.160 / 0.150)


def test_table_and_json(tmp_path):
    text = table(["name", "ms"], [["a", 1.5], ["bb", 10.25]])
    assert text.splitlines() == ["name      ms", "----  ------", "   a   1.500", "  bb  10.250"]
    path = write_json(tmp_path / "sub" / "r.json", {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}


def test_transfer_layer_sends_single_out_stalls():
    from pdserve_tools.bench.transfer import Sample, layer_sends, summarize

    def sample(layerwise: bool, sends: tuple[float, ...]) -> Sample:
        return Sample(layerwise, bytes=1000 * len(sends), layers=len(sends), busy_s=sum(sends), span_s=1.0,
                      exposed_s=0.0 if layerwise else 1.0, prefill_compute_s=2.0, send_seconds=sends)

    steady = sample(True, (0.0004,) * 9 + (0.0005,))
    stalled = sample(False, (0.0004,) * 9 + (0.004,))  # one send waited ten times as long as the others
    assert layer_sends([steady]) == pytest.approx({"p50_us": 400.0, "p99_us": 491.0, "stalled_share": 0.0})
    whole = layer_sends([stalled])
    assert whole["p50_us"] == pytest.approx(400.0)
    assert whole["stalled_share"] == pytest.approx(0.004 / (9 * 0.0004 + 0.004))
    assert layer_sends([]) == {"p50_us": 0.0, "p99_us": 0.0, "stalled_share": 0.0}

    raw = {"raw": {"median": 4.0}, "tcp": {"median": 3.0}}
    result = summarize([steady, stalled], raw, "tcp")
    assert result["layer_sends_layerwise"]["stalled_share"] == 0.0
    assert result["layer_sends_whole"]["stalled_share"] > 0.5
    assert result["kv_gbps_whole"] < result["kv_gbps_layerwise"]  # the stall costs the whole-KV mode throughput
    json.dumps(result)  # the JSON the benchmark writes
