"""The figures of `pdserve bench multinode`, from what its runs measured: the JSON document and its tables. Pure.

A `Measured` is one deployment's records: for each probe transfer the connectors' record of its send and of its
load on the decode side (`transfer.Sample`; half with layer-wise streaming, half with the whole KV sent after the
forward), the requests served through the router (TTFT, TPOT and per-phase timings as the probe saw them), the
router's /metrics text, and, across nodes, the raw TCP sends of the same link. Per link (medians over requests,
`stats.percentile`), on delivered time, the seconds until the decode worker had the last layer in its blocks
(both nodes are namespaces of one machine, so the prefill's and the decode's wall clocks are one clock):

- `kv_gbit`: KV bytes over (the decode had the last layer - the first byte was sent), with the whole KV sent
  after the forward (with layer-wise streaming that span is paced by the forward pass, not the link);
  `raw_gbit`: bytes over the seconds a plain socket send of a comparable size took until the receiver
  acknowledged it, once the deployment had stopped; `transfer_vs_raw` = kv_gbit / raw_gbit (goal >= 0.8);
  `raw_beside_gbit` and `transfer_vs_raw_beside`: the same sends while the deployment was still up, idle after
  its probe (its Ray nodes, router and engine processes on the same cores), as the KV path runs;
- `exposed_share`: (the decode had the last layer - end of the forward) / (that - first byte sent), with
  layer-wise streaming: the part of the transfer the forward pass did not hide (goal <= 0.3);
- `delivered_bounded_whole`, `delivered_bounded_layerwise`: samples whose every layer had already landed in the
  decode's receive buffer when the decode request posted its blocks; their "last layer" time is that of the
  copy into the blocks, later than the arrival, so `kv_gbit` leans low and `exposed_share` high: a goal met
  with them is met, one missed with them may not be;
- for reference, the send-time figures of layer-wise transfers: `kv_gbit_send` (bytes over the seconds spent
  inside the transport's send, which with TCP returns once the bytes are in the socket buffer),
  `transfer_vs_raw_send` and `exposed_share_send` ((last byte sent - end of the forward) / (first to last byte
  sent));
- `send_span_ms_p50` (first byte sent -> last byte sent), `delivered_span_ms_p50` (first byte sent -> the decode
  had the last layer), both layer-wise, and `kv_wait_ms_p50` (the per-phase timing `kv_transfer` of requests
  through the router: how long the decode engine waited for KV that had not landed);
- TTFT and TPOT p50 and their ratios to the same 1P1D on one node (goals <= 1.2 and <= 1.1);
- `transfer_failures`: `pdserve_kv_transfer_failures_total` (every reason) plus
  `pdserve_kv_transfers_total{result="failed"}` (goal 0);
- `engine_step_ms`: the mean engine step per worker role over the requests through the router
  (`pdserve_engine_step_seconds` between the /metrics read before them and the one after), and
  `decode_step_ratio`, the decode role's against the one-node baseline's: a TPOT ratio that this ratio matches
  comes from the decode engine stepping slower, not from anything between the engine and the client.

The document's top-level `ttft_p50_ratio` and `tpot_p50_ratio` are the worst (highest) over the links, and
`transfer_failures` is the sum over every deployment of the run, the one-node one included. A figure that cannot
be computed (no samples, a zero baseline) is null.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pdserve_tools.bench.report import table
from pdserve_tools.bench.router_probe import ENGINE_STEP, mean_between, sum_count_by
from pdserve_tools.bench.transfer import Sample
from pdserve_tools.stats import percentile

GOALS = {"transfer_vs_raw_min": 0.8, "exposed_share_max": 0.3, "ttft_p50_ratio_max": 1.2, "tpot_p50_ratio_max": 1.1,
         "transfer_failures_max": 0}
FAILURES = "pdserve_kv_transfer_failures_total"
TRANSFERS = "pdserve_kv_transfers_total"


@dataclass(frozen=True)
class Measured:
    """One deployment's records; `link_gbit` None: an unshaped link (or no link: one node)."""

    link_gbit: float | None
    samples: Sequence[Sample]
    served: Sequence[dict[str, Any]]  # one per request: ttft_s, tpot_s, timings, error
    metrics: str  # the router's /metrics text after the run
    metrics_before: str = ""  # ... before the requests through the router (after the probe's own transfers)
    raw_bytes: int = 0  # bytes per raw send; 0: none measured (one node)
    raw_seconds: Sequence[float] = field(default_factory=tuple)  # once the deployment had stopped
    raw_beside_seconds: Sequence[float] = field(default_factory=tuple)  # while it was up, idle


def transfer_failures(metrics: str) -> int:
    """KV transfers that could not start (every reason) plus those that ended failed, from exposition text."""
    total = 0.0
    for line in metrics.splitlines():
        name, _, rest = line.partition("{")
        if line.startswith("#") or not line.strip():
            continue
        if name.split()[0] == FAILURES or (name == TRANSFERS and 'result="failed"' in rest):
            total += float(line.split()[-1])
    return int(total)


def _median(values: Sequence[float]) -> float | None:
    return percentile(values, 50) if values else None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0 or not (math.isfinite(num) and math.isfinite(den)):
        return None
    return num / den


def latency(m: Measured) -> dict[str, Any]:
    """TTFT, TPOT and the decode's wait for KV over the requests served without error."""
    ok = [s for s in m.served if not s.get("error")]
    return {
        "requests": len(m.served),
        "request_errors": len(m.served) - len(ok),
        "ttft_p50_s": _median([s["ttft_s"] for s in ok]),
        "tpot_p50_s": _median([s["tpot_s"] for s in ok]),
        "kv_wait_ms_p50": _median([s["timings"]["kv_transfer"] * 1e3 for s in ok]),
        "transfer_failures": transfer_failures(m.metrics),
        "engine_step_ms": engine_step_ms(m),
    }


def engine_step_ms(m: Measured) -> dict[str, float]:
    """Each worker role's mean engine step over the requests through the router, in ms (roles that stepped)."""
    before = sum_count_by(m.metrics_before, ENGINE_STEP, "role")
    steps = {role: mean_between(before.get(role, (0.0, 0.0)), after) * 1e3
             for role, after in sum_count_by(m.metrics, ENGINE_STEP, "role").items()}
    return {role: ms for role, ms in sorted(steps.items()) if math.isfinite(ms)}


def _known(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def transfer(m: Measured) -> dict[str, Any]:
    """The KV and raw throughput of the link, their ratio, and how much of the transfer the forward hid."""
    layerwise = [s for s in m.samples if s.layerwise]
    whole = [s for s in m.samples if not s.layerwise]
    kv = _median([g * 8 for g in _known([s.delivered_gbps for s in whole])])
    kv_send = _median([s.gbps * 8 for s in layerwise])
    raw, beside = (_median([m.raw_bytes * 8 / s / 1e9 for s in seconds if s > 0]) if m.raw_bytes else None
                   for seconds in (m.raw_seconds, m.raw_beside_seconds))
    return {
        "raw_gbit": raw,
        "kv_gbit": kv,
        "transfer_vs_raw": _ratio(kv, raw),
        "raw_beside_gbit": beside,
        "transfer_vs_raw_beside": _ratio(kv, beside),
        "exposed_share": _median(_known([s.delivered_exposed_share for s in layerwise])),
        "delivered_bounded_whole": sum(s.landed_early for s in whole),
        "delivered_bounded_layerwise": sum(s.landed_early for s in layerwise),
        "kv_gbit_send": kv_send,
        "transfer_vs_raw_send": _ratio(kv_send, raw),
        "exposed_share_send": _median([s.exposed_share for s in layerwise]),
        "send_span_ms_p50": _median([s.span_s * 1e3 for s in layerwise]),
        "delivered_span_ms_p50": _median([d * 1e3 for d in _known([s.delivered_s for s in layerwise])]),
        "send_busy_ms_p50": _median([s.busy_s * 1e3 for s in layerwise]),
        "kv_bytes_per_request": _median([float(s.bytes) for s in m.samples]),
        "raw_bytes_per_send": m.raw_bytes,
    }


def link_figures(m: Measured, one_node: dict[str, Any]) -> dict[str, Any]:
    """The link's figures, its latencies as ratios to `one_node`, the baseline run in the same cluster just
    before it (so that both saw the same machine)."""
    lat = latency(m)
    return {"link_gbit": m.link_gbit, **transfer(m), **lat,
            "one_node_ttft_p50_s": one_node["ttft_p50_s"], "one_node_tpot_p50_s": one_node["tpot_p50_s"],
            "ttft_p50_ratio": _ratio(lat["ttft_p50_s"], one_node["ttft_p50_s"]),
            "tpot_p50_ratio": _ratio(lat["tpot_p50_s"], one_node["tpot_p50_s"]),
            "one_node_engine_step_ms": one_node["engine_step_ms"],
            "decode_step_ratio": _ratio(lat["engine_step_ms"].get("decode"), one_node["engine_step_ms"].get("decode"))}


def _worst(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if len(known) == len(values) and known else None


def one_node_figures(m: Measured) -> dict[str, Any]:
    raw_only = ("raw_gbit", "transfer_vs_raw", "raw_beside_gbit", "transfer_vs_raw_beside", "transfer_vs_raw_send",
                "raw_bytes_per_send")
    return {**latency(m), **{k: v for k, v in transfer(m).items() if k not in raw_only}}


def summarize(one_node: Sequence[Measured], links: Sequence[Measured], settings: dict[str, Any]) -> dict[str, Any]:
    """The JSON document of a run: every link's figures, each against the one-node baseline run beside it
    (`one_node[i]` for `links[i]`), the headline ratios and goals; `one_node` in the document is the first
    baseline's figures."""
    bases = [one_node_figures(m) for m in one_node]
    per_link = [link_figures(m, base) for m, base in zip(links, bases, strict=True)]
    base = bases[0]
    ttft = _worst([f["ttft_p50_ratio"] for f in per_link])
    tpot = _worst([f["tpot_p50_ratio"] for f in per_link])
    failures = sum(b["transfer_failures"] for b in bases) + sum(f["transfer_failures"] for f in per_link)
    met = {
        "transfer_vs_raw": all((f["transfer_vs_raw"] or 0.0) >= GOALS["transfer_vs_raw_min"] for f in per_link),
        "exposed_share": all(f["exposed_share"] is not None and f["exposed_share"] <= GOALS["exposed_share_max"]
                             for f in per_link),
        "ttft_p50_ratio": ttft is not None and ttft <= GOALS["ttft_p50_ratio_max"],
        "tpot_p50_ratio": tpot is not None and tpot <= GOALS["tpot_p50_ratio_max"],
        "transfer_failures": failures <= GOALS["transfer_failures_max"],
    }
    return {"ttft_p50_ratio": ttft, "tpot_p50_ratio": tpot, "transfer_failures": failures,
            "request_errors": sum(b["request_errors"] for b in bases) + sum(f["request_errors"] for f in per_link),
            "links": per_link, "one_node": base, "goals": GOALS, "met": met, "settings": settings}


def link_name(gbit: float | None) -> str:
    return "unshaped" if gbit is None else f"{gbit:g} Gbit/s"


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _step(ms: dict[str, float]) -> str:
    return _f(ms.get("decode"), 1)


def _bounded(f: dict[str, Any]) -> str:
    return f"{f['delivered_bounded_whole']}+{f['delivered_bounded_layerwise']}"


def render(r: dict[str, Any]) -> str:
    """Two tables, transfer and latency, one row per link after the one-node baseline's."""
    base = r["one_node"]
    rows = [["one node", "-", "-", _f(base["kv_gbit"]), "-", "-", _f(base["exposed_share"]), _bounded(base),
             _f(base["kv_gbit_send"]), _f(base["exposed_share_send"]), _f(base["send_span_ms_p50"], 1),
             _f(base["kv_wait_ms_p50"], 1), str(base["transfer_failures"])]]
    rows += [[f"two nodes, {link_name(f['link_gbit'])}", _f(f["raw_gbit"]), _f(f["raw_beside_gbit"]), _f(f["kv_gbit"]),
              _f(f["transfer_vs_raw"]), _f(f["transfer_vs_raw_beside"]), _f(f["exposed_share"]), _bounded(f),
              _f(f["kv_gbit_send"]),
              _f(f["exposed_share_send"]), _f(f["send_span_ms_p50"], 1), _f(f["kv_wait_ms_p50"], 1),
              str(f["transfer_failures"])] for f in r["links"]]
    transfer_table = table(["layout, link (tbf)", "raw Gbit/s", "raw beside", "KV Gbit/s", "KV/raw (>= 0.8)",
                            "KV/raw beside", "exposed (<= 0.3)",
                            "bounded (whole+lw)", "in send: KV Gbit/s", "exposed", "send span ms", "KV wait ms",
                            "failures"], rows)
    rows = [[f"two nodes, {link_name(f['link_gbit'])}", _ms(f["one_node_ttft_p50_s"]), _ms(f["ttft_p50_s"]),
             _f(f["ttft_p50_ratio"]), _ms(f["one_node_tpot_p50_s"]), _ms(f["tpot_p50_s"]), _f(f["tpot_p50_ratio"]),
             _step(f["one_node_engine_step_ms"]), _step(f["engine_step_ms"]), _f(f["decode_step_ratio"]),
             str(f["request_errors"])] for f in r["links"]]
    latency_table = table(["layout, link (tbf)", "TTFT p50 ms: one node", "two nodes", "x (<= 1.2)",
                           "TPOT p50 ms: one node", "two nodes", "x (<= 1.1)", "decode step ms: one node",
                           "two nodes", "x", "request errors"], rows)
    met = ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in r["met"].items())
    note = ("KV Gbit/s, KV/raw and exposed are delivered figures (until the decode had the last layer); raw: "
            "once the deployment had stopped; raw beside: while it was up, idle; "
            "bounded: samples that landed before the decode posted its blocks, whose figures are bounds "
            "(KV Gbit/s low, exposed high)")
    lat_note = "each link's one-node baseline ran in the same cluster just before it"
    return f"{transfer_table}\n{note}\n\n{latency_table}\n{lat_note}\n\ngoals: {met}"
