"""`pdserve bench multinode`'s figures from measured records: ratios, goals, failures and the JSON document."""

import dataclasses
import json

import pytest

from pdserve_tools.bench.multinode_report import Measured, render, summarize, transfer_failures
from pdserve_tools.bench.transfer import Sample, sample_of

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


def sample(mb: float, busy_s: float, exposed_s: float, span_s: float = 1.0, *, layerwise: bool = True,
           delivered_s: float | None = None, delivered_exposed_s: float | None = None, early: bool = False) -> Sample:
    return Sample(layerwise, int(mb * 1e6), 30, busy_s, span_s, exposed_s, 2.0, (busy_s / 30,) * 30, delivered_s,
                  delivered_exposed_s, early)


def whole(mb: float, delivered_s: float, early: bool = False) -> Sample:
    """The whole KV sent after the forward: 10 ms inside send, whatever the link, as TCP's socket buffer allows."""
    return sample(mb, 0.01, 0.01, 0.01, layerwise=False, delivered_s=delivered_s, delivered_exposed_s=delivered_s,
                  early=early)


def request(ttft_s: float, tpot_s: float, kv_s: float = 0.0, error: str = "") -> dict:
    if error:
        return {"error": error, "tokens": 0}
    return {"ttft_s": ttft_s, "tpot_s": tpot_s, "tokens": 16, "error": "", "timings": {"kv_transfer": kv_s}}


def test_transfer_failures_add_failures_of_every_reason_and_failed_transfers():
    assert transfer_failures(METRICS) == 2 + 1 + 3
    assert transfer_failures('pdserve_kv_transfers_total{result="ok"} 5.0\n') == 0
    assert transfer_failures("") == 0


def measured_run() -> dict:
    one = Measured(None, [sample(10, 0.01, 0.0, delivered_s=1.0, delivered_exposed_s=0.0), whole(10, 0.02)],
                   [request(0.10, 0.020), request(0.12, 0.020), request(0.14, 0.022)], "")
    # whole KV: 10 MB delivered in 0.1 s, the median: 0.8 Gbit/s; 10 MB raw sends in 0.08 s: 1 Gbit/s.
    # Layer-wise: 10 ms inside send (8 Gbit/s), the last byte sent at the end of the forward, the last layer landed
    # after it.
    slow = Measured(1.0, [sample(10, 0.01, 0.0, delivered_s=1.1, delivered_exposed_s=0.11),
                          sample(10, 0.01, 0.0, delivered_s=1.5, delivered_exposed_s=0.75),
                          sample(10, 0.02, 0.0, delivered_s=1.2, delivered_exposed_s=0.24, early=True),
                          whole(10, 0.1), whole(10, 0.12), whole(10, 0.05, early=True)],
                    [request(0.15, 0.021, 0.05), request(0.18, 0.022, 0.06), request(0.2, 0.030, 0.07)],
                    METRICS, raw_bytes=10_000_000, raw_seconds=(0.08, 0.08, 0.5), raw_beside_seconds=(0.16, 0.1))
    fast = Measured(None, [sample(10, 0.01, 0.0, delivered_s=1.0, delivered_exposed_s=0.0), whole(10, 0.01)] * 3,
                    [request(0.11, 0.020), request(0.12, 0.021), request(1.0, 0.0, error="DEADLINE_EXCEEDED")],
                    "", raw_bytes=10_000_000, raw_seconds=(0.008,))
    return summarize([one, one], [fast, slow], {"prompt_tokens": 1024})


def test_each_link_is_compared_with_its_raw_link_and_the_one_node_baseline():
    r = measured_run()
    fast, slow = r["links"]
    assert slow["link_gbit"] == 1.0 and fast["link_gbit"] is None
    assert slow["kv_gbit"] == pytest.approx(0.8)  # the median whole-KV sample: 10 MB delivered in 0.1 s
    assert slow["raw_gbit"] == pytest.approx(1.0)  # the median raw send: 10 MB over 0.08 s
    assert slow["transfer_vs_raw"] == pytest.approx(0.8)
    # the raw sends beside the deployment: 10 MB over 0.16 and 0.1 s, 0.5 and 0.8 Gbit/s, the median 0.65
    assert slow["raw_beside_gbit"] == pytest.approx(0.65)
    assert slow["transfer_vs_raw_beside"] == pytest.approx(0.8 / 0.65)
    assert slow["exposed_share"] == pytest.approx(0.2)  # median of 0.1, 0.5, 0.2 of the delivered spans
    assert slow["delivered_span_ms_p50"] == pytest.approx(1200.0)
    assert slow["delivered_bounded_whole"] == 1 and slow["delivered_bounded_layerwise"] == 1
    assert slow["kv_wait_ms_p50"] == pytest.approx(60.0)
    assert slow["send_span_ms_p50"] == pytest.approx(1000.0)
    assert slow["ttft_p50_ratio"] == pytest.approx(0.18 / 0.12)
    assert slow["tpot_p50_ratio"] == pytest.approx(0.022 / 0.020)
    assert slow["transfer_failures"] == 6
    # the failed request counts as an error and is left out of the latencies
    assert fast["request_errors"] == 1 and fast["ttft_p50_s"] == pytest.approx(0.115)
    assert fast["transfer_vs_raw"] == pytest.approx(8.0 / 10.0)
    assert fast["raw_beside_gbit"] is None and fast["transfer_vs_raw_beside"] is None  # none measured


def test_the_send_time_figures_stay_beside_the_delivered_ones():
    """Time inside send ends once TCP has the bytes in its socket buffer: on a slow link it outruns the link."""
    slow = measured_run()["links"][1]
    assert slow["kv_gbit_send"] == pytest.approx(8.0)  # the median layer-wise sample: 10 MB in 10 ms inside send
    assert slow["transfer_vs_raw_send"] == pytest.approx(8.0)  # the ratio the delivered one replaces
    assert slow["exposed_share_send"] == 0.0  # every send returned by the end of the forward
    assert slow["exposed_share"] > slow["exposed_share_send"]


def test_layerwise_transfers_leave_the_link_figure_alone_and_whole_ones_the_exposed_share():
    layerwise_only = Measured(1.0, [sample(10, 0.01, 0.0, delivered_s=2.0, delivered_exposed_s=0.2)], [], "",
                              raw_bytes=10_000_000, raw_seconds=(0.08,))
    figures = summarize([layerwise_only], [layerwise_only], {})["links"][0]
    assert figures["kv_gbit"] is None and figures["transfer_vs_raw"] is None  # a forward-paced span is no link speed
    assert figures["exposed_share"] == pytest.approx(0.1)
    whole_only = Measured(1.0, [whole(10, 0.1)], [], "", raw_bytes=10_000_000, raw_seconds=(0.08,))
    figures = summarize([whole_only], [whole_only], {})["links"][0]
    assert figures["transfer_vs_raw"] == pytest.approx(0.8) and figures["exposed_share"] is None


def test_a_sample_is_timed_until_the_decode_had_the_last_layer():
    sent = {"bytes": 10_000_000, "layers": 30, "busy": 0.01, "first_send": 100.0, "last_send": 101.0,
            "compute_end": 101.0, "send_seconds": [0.01 / 30] * 30}
    recv = {"ok": True, "posted": 100.5, "landed": 101.25, "layers": 30, "early_layers": 29}
    s = sample_of(True, sent, recv, 1.0)
    assert s.span_s == pytest.approx(1.0) and s.exposed_share == 0.0 and s.gbps == pytest.approx(1.0)
    assert s.delivered_s == pytest.approx(1.25) and s.delivered_gbps == pytest.approx(0.008)  # GB/s
    assert s.delivered_exposed_share == pytest.approx(0.2) and not s.landed_early
    early = sample_of(True, sent, {**recv, "early_layers": 30}, 1.0)
    assert early.landed_early and early.delivered_s == pytest.approx(1.25)
    # with the arrival recorded, a sample whose layers all waited in the stash is exact, not a bound
    arrived = sample_of(True, sent, {**recv, "early_layers": 30, "arrived": 101.1}, 1.0)
    assert not arrived.landed_early and arrived.delivered_s == pytest.approx(1.1)
    for missing in (None, {**recv, "ok": False}):  # no record, or a load that failed: nothing delivered
        s = sample_of(True, sent, missing, 1.0)
        assert s.delivered_s is None and s.delivered_gbps is None and s.delivered_exposed_share is None
    # a record from before loads said how many layers were early
    assert not sample_of(False, sent, {"ok": True, "posted": 100.5, "landed": 101.25}, 1.0).landed_early


def test_samples_round_trip_through_the_probe_json():
    s = sample(10, 0.01, 0.0, delivered_s=1.1, delivered_exposed_s=0.11, early=True)
    d = json.loads(json.dumps(dataclasses.asdict(s)))
    assert Sample(**{**d, "send_seconds": tuple(d["send_seconds"])}) == s
    old = {k: v for k, v in d.items() if k not in ("delivered_s", "delivered_exposed_s", "landed_early")}
    assert Sample(**{**old, "send_seconds": tuple(old["send_seconds"])}).delivered_gbps is None


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


def test_each_link_is_compared_with_the_one_node_baseline_run_beside_it():
    quiet = Measured(None, [], [request(0.10, 0.020)], "")
    busy = Measured(None, [], [request(0.30, 0.060)], "")
    link_quiet = Measured(None, [], [request(0.11, 0.021)], "")
    link_busy = Measured(10.0, [], [request(0.33, 0.063)], "")
    r = summarize([quiet, busy], [link_quiet, link_busy], {})
    assert [f["ttft_p50_ratio"] for f in r["links"]] == pytest.approx([1.1, 1.1])
    assert [f["one_node_ttft_p50_s"] for f in r["links"]] == pytest.approx([0.10, 0.30])
    assert r["tpot_p50_ratio"] == pytest.approx(1.05) and r["one_node"]["ttft_p50_s"] == pytest.approx(0.10)
    with pytest.raises(ValueError):  # a baseline per link
        summarize([quiet], [link_quiet, link_busy], {})


def test_figures_that_cannot_be_computed_are_null_and_fail_their_goals():
    one = Measured(None, [], [request(0.1, 0.02)], "")
    nothing = Measured(10.0, [], [request(0.0, 0.0, error="UNAVAILABLE")], "")
    r = summarize([one], [nothing], {})
    (link,) = r["links"]
    assert link["kv_gbit"] is None and link["raw_gbit"] is None and link["transfer_vs_raw"] is None
    assert link["ttft_p50_ratio"] is None and r["ttft_p50_ratio"] is None
    assert not any(r["met"][k] for k in ("transfer_vs_raw", "exposed_share", "ttft_p50_ratio", "tpot_p50_ratio"))
    json.loads(json.dumps(r, allow_nan=False))


def test_the_tables_name_every_layout_and_the_goals():
    text = render(measured_run())
    for part in ("one node", "two nodes, unshaped", "two nodes, 1 Gbit/s", "0.80", "1.50", "ttft_p50_ratio NOT met",
                 "transfer_vs_raw met", "1+1", "delivered figures"):
        assert part in text, text


def steps(decode: tuple[float, int], prefill: tuple[float, int] = (0.0, 0)) -> str:
    """/metrics text with the engine-step histogram's sum and count per role."""
    lines = ["# TYPE pdserve_engine_step_seconds histogram"]
    for role, (total, count) in (("decode", decode), ("prefill", prefill)):
        labels = f'instance="{role}-0",role="{role}"'
        lines += [f'pdserve_engine_step_seconds_bucket{{{labels},le="+Inf"}} {count}',
                  f"pdserve_engine_step_seconds_count{{{labels}}} {count}",
                  f"pdserve_engine_step_seconds_sum{{{labels}}} {total}"]
    return "\n".join(lines) + "\n"


def test_engine_steps_count_only_the_requests_through_the_router_and_the_decode_step_is_compared_per_link():
    # the probe's own transfers stepped before the first read (1 s over 10 decode steps); the requests after it
    one = Measured(None, [], [request(0.1, 0.02)], steps((1.0 + 0.6, 10 + 20), (2.0, 5)), steps((1.0, 10), (1.0, 4)))
    link = Measured(1.0, [], [request(0.1, 0.025)], steps((1.0 + 0.75, 10 + 20)), steps((1.0, 10)))
    r = summarize([one], [link], {})
    (f,) = r["links"]
    assert r["one_node"]["engine_step_ms"] == pytest.approx({"decode": 30.0, "prefill": 1000.0})
    assert f["engine_step_ms"] == pytest.approx({"decode": 37.5})  # prefill did not step during the requests
    assert f["one_node_engine_step_ms"]["decode"] == pytest.approx(30.0)
    assert f["decode_step_ratio"] == pytest.approx(1.25) and f["tpot_p50_ratio"] == pytest.approx(1.25)
    assert "37.5" in render(r)
    assert summarize([one], [Measured(1.0, [], [request(0.1, 0.02)], "")], {})["links"][0]["decode_step_ratio"] is None
