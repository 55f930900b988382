"""`pdserve bench multinode`'s figures from measured records: ratios, goals, failures and the JSON document."""

import json

import pytest

from pdserve_tools.bench.multinode_report import Measured, render, summarize, transfer_failures
from pdserve_tools.bench.transfer import Sample

METRICS = """# HELP pdserve_kv_transfers_total KV transfers that ended, by result
# TYPE pdserve_kv_transfers_total counter
pdserve_kv_transfers_total{result="ok"} 9.0
pdserve_kv_transfers_total{result="failed"} 2.0
pdserve_kv_transfers_created{result="ok"} 1.7e+09
# TYPE pdserve_kv_transfer_failures_total counter
pdserve_kv_transfer_failures_total{reason="unreachable"} 1.0
pdserve_kv_transfer_failures_total{reason="refused"} 3.0
pdserve_kv_transfer_failures_created{reason="refused"} 1.7e+09
pdserve_kv_transfer_bytes_total 4.5e+07
"""


def sample(mb: float, busy_s: float, exposed_s: float, span_s: float = 1.0) -> Sample:
    return Sample(True, int(mb * 1e6), 30, busy_s, span_s, exposed_s, 2.0, (busy_s / 30,) * 30)


def request(ttft_s: float, tpot_s: float, kv_s: float = 0.0, error: str = "") -> dict:
    if error:
        return {"error": error, "tokens": 0}
    return {"ttft_s": ttft_s, "tpot_s": tpot_s, "tokens": 16, "error": "", "timings": {"kv_transfer": kv_s}}


def test_transfer_failures_add_failures_of_every_reason_and_failed_transfers():
    assert transfer_failures(METRICS) == 2 + 1 + 3
    assert transfer_failures('pdserve_kv_transfers_total{result="ok"} 5.0\n') == 0
    assert transfer_failures("") == 0


def measured_run() -> dict:
    one = Measured(None, [sample(10, 0.01, 0.0)], [request(0.10, 0.020), request(0.12, 0.020),
                                                  request(0.14, 0.022)], "")
    # 10 MB in 0.1 s inside send: 0.8 Gbit/s; 10 MB raw sends in 0.08 s: 1 Gbit/s
    slow = Measured(1.0, [sample(10, 0.1, 0.1), sample(10, 0.1, 0.5), sample(10, 0.2, 0.2)],
                    [request(0.15, 0.021, 0.05), request(0.18, 0.022, 0.06), request(0.2, 0.030, 0.07)],
                    METRICS, raw_bytes=10_000_000, raw_seconds=(0.08, 0.08, 0.5))
    fast = Measured(None, [sample(10, 0.01, 0.0)] * 3, [request(0.11, 0.020), request(0.12, 0.021),
                                                       request(1.0, 0.0, error="DEADLINE_EXCEEDED")],
                    "", raw_bytes=10_000_000, raw_seconds=(0.008,))
    return summarize(one, [fast, slow], {"prompt_tokens": 1024})


def test_each_link_is_compared_with_its_raw_link_and_the_one_node_baseline():
    r = measured_run()
    fast, slow = r["links"]
    assert slow["link_gbit"] == 1.0 and fast["link_gbit"] is None
    assert slow["kv_gbit"] == pytest.approx(0.8)  # the median sample: 10 MB over 0.1 s
    assert slow["raw_gbit"] == pytest.approx(1.0)  # the median raw send: 10 MB over 0.08 s
    assert slow["transfer_vs_raw"] == pytest.approx(0.8)
    assert slow["exposed_share"] == pytest.approx(0.2)  # median of 0.1, 0.5, 0.2 (span 1 s)
    assert slow["kv_wait_ms_p50"] == pytest.approx(60.0)
    assert slow["send_span_ms_p50"] == pytest.approx(1000.0)
    assert slow["ttft_p50_ratio"] == pytest.approx(0.18 / 0.12)
    assert slow["tpot_p50_ratio"] == pytest.approx(0.022 / 0.020)
    assert slow["transfer_failures"] == 6
    # the failed request counts as an error and is left out of the latencies
    assert fast["request_errors"] == 1 and fast["ttft_p50_s"] == pytest.approx(0.115)
    assert fast["transfer_vs_raw"] == pytest.approx(8.0 / 10.0)


def test_the_headline_is_the_worst_link_and_every_failure_of_the_run():
    r = measured_run()
    assert r["ttft_p50_ratio"] == pytest.approx(0.18 / 0.12)
    assert r["tpot_p50_ratio"] == pytest.approx(0.022 / 0.020)
    assert r["transfer_failures"] == 6 and r["request_errors"] == 1
    assert r["met"] == {"transfer_vs_raw": True, "exposed_share": True, "ttft_p50_ratio": False,
                        "tpot_p50_ratio": True, "transfer_failures": False}
    assert r["one_node"]["ttft_p50_s"] == pytest.approx(0.12) and "raw_gbit" not in r["one_node"]
    assert r["settings"] == {"prompt_tokens": 1024}
    json.loads(json.dumps(r, allow_nan=False))  # plain JSON: no NaN anywhere


def test_figures_that_cannot_be_computed_are_null_and_fail_their_goals():
    one = Measured(None, [], [request(0.1, 0.02)], "")
    nothing = Measured(10.0, [], [request(0.0, 0.0, error="UNAVAILABLE")], "")
    r = summarize(one, [nothing], {})
    (link,) = r["links"]
    assert link["kv_gbit"] is None and link["raw_gbit"] is None and link["transfer_vs_raw"] is None
    assert link["ttft_p50_ratio"] is None and r["ttft_p50_ratio"] is None
    assert not any(r["met"][k] for k in ("transfer_vs_raw", "exposed_share", "ttft_p50_ratio", "tpot_p50_ratio"))
    json.loads(json.dumps(r, allow_nan=False))


def test_the_tables_name_every_layout_and_the_goals():
    text = render(measured_run())
    for part in ("one node", "two nodes, unshaped", "two nodes, 1 Gbit/s", "0.80", "1.50", "ttft_p50_ratio NOT met",
                 "transfer_vs_raw met"):
        assert part in text, text
