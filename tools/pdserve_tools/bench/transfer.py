"""`pdserve bench transfer`: KV transfer of real requests against the raw loopback bandwidth, in one run.

1. Raw: the `transport` benchmark's raw loopback TCP and the configured transport, on messages of the size one
   layer of the benchmark's prompt sends (so the two are compared on equal messages).
2. Real: a 1P1D deployment; each request's prompt is prefilled, its KV streams to the decode instance, the decode
   engine continues. Requests alternate layer-wise streaming on and off (one deployment, the same engines).

Figures, medians over requests:
- KV throughput = bytes sent / seconds spent inside the transport's `send` (the transport's own speed on real
  KV, paced or not by the forward pass); ratio to raw (goal >= 0.8).
- exposed share = (last byte sent - end of the forward) / (last byte sent - first byte sent): the part of the
  transfer the forward pass did not hide (goal <= 0.3 with layer-wise streaming on; about 1 with it off).
- one layer's send: p50 and p99 over every layer of every request, and the share of all send time spent in
  stalled sends (over 3x the median): where the throughput is lost to waits, not to moving bytes.
- delivered: from the decode's record of the load, when it had the last layer in its blocks (`landed`; both ends
  run on this machine, so the prefill's and the decode's wall clocks are one clock). Delivered KV throughput =
  bytes / (last layer landed - first byte sent), with the whole KV sent after the forward (with layer-wise
  streaming that span is paced by the forward); delivered exposed share = (last layer landed - end of the
  forward) / (last layer landed - first byte sent), with layer-wise streaming. When every layer had landed in
  the decode's receive buffer before the decode request posted its blocks, `landed` is when they were copied
  there, later than their arrival: such a sample's delivered throughput is a lower bound and its exposed share
  an upper bound (`delivered_bounded` counts them).

    pdserve bench transfer [--model PATH] [--prompt-tokens 1024] [--requests 8]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import sys
import time
from typing import Any

from tqdm import tqdm

from kv_transfer.params import RecvSpec, SendSpec, to_params
from pdserve.config import ServeConfig, config_from_dict, load_config
from pdserve_tools.bench.report import table, write_json
from pdserve_tools.bench.serve_targets import target_data
from pdserve_tools.stats import percentile
from router.request import SamplingSpec

RECORD_TIMEOUT_S = 60.0


@dataclasses.dataclass(frozen=True)
class Sample:
    layerwise: bool
    bytes: int
    layers: int
    busy_s: float
    span_s: float  # first byte sent -> last byte sent
    exposed_s: float  # end of the forward -> last byte sent
    prefill_compute_s: float
    send_seconds: tuple[float, ...] = ()  # each layer's time inside send
    delivered_s: float | None = None  # first byte sent -> the decode had the last layer (None: no decode record)
    delivered_exposed_s: float | None = None  # end of the forward -> the decode had the last layer
    landed_early: bool = False  # every layer waited in the decode's receive buffer before its post: bounds only

    @property
    def gbps(self) -> float:
        return self.bytes / self.busy_s / 1e9 if self.busy_s > 0 else 0.0

    @property
    def exposed_share(self) -> float:
        return min(1.0, self.exposed_s / self.span_s) if self.span_s > 0 else 1.0

    @property
    def delivered_gbps(self) -> float | None:
        """Bytes over the seconds from the first byte sent until the decode had the last layer."""
        return self.bytes / self.delivered_s / 1e9 if self.delivered_s else None

    @property
    def delivered_exposed_share(self) -> float | None:
        """(the decode had the last layer - end of the forward) / (that - first byte sent)."""
        if not self.delivered_s or self.delivered_exposed_s is None:
            return None
        return min(1.0, self.delivered_exposed_s / self.delivered_s)


def sample_of(layerwise: bool, sent: dict[str, Any], recv: dict[str, Any] | None, prefill_compute_s: float) -> Sample:
    """A transfer's `Sample` from the prefill's record of its send and the decode's record of its load (None: no
    decode record); the two records' wall-clock times must come from one clock."""
    span = sent["last_send"] - sent["first_send"]
    exposed = max(0.0, sent["last_send"] - sent["compute_end"])
    delivered = delivered_exposed = None
    early = False
    if recv is not None and recv["ok"]:
        arrived = float(recv.get("arrived") or 0.0)  # older records: only `landed`, a bound when layers came early
        done = arrived or recv["landed"]
        delivered = max(0.0, done - sent["first_send"])
        delivered_exposed = max(0.0, done - sent["compute_end"])
        early = not arrived and int(recv.get("early_layers", 0)) >= int(recv.get("layers", sent["layers"])) > 0
    return Sample(layerwise, int(sent["bytes"]), int(sent["layers"]), float(sent["busy"]), span, exposed,
                  prefill_compute_s, tuple(sent["send_seconds"]), delivered, delivered_exposed, early)


@dataclasses.dataclass(frozen=True)
class Pair:
    """A prefill and a decode worker a transfer probe drives directly (Ray actor handles), bypassing the router."""

    prefill: Any
    prefill_id: str
    decode: Any
    decode_id: str
    decode_kv_address: str


async def transfer_sample(pair: Pair, rid: str, prompt: list[int], layerwise: bool) -> Sample:
    """Prefills `prompt` (transfer id `rid`), streams its KV to the decode worker, which continues one token; the
    prefill's record of the send and the decode's record of the load."""
    deadline = time.time() + 60.0
    n = len(prompt)
    send = SendSpec(rid, pair.decode_kv_address, pair.decode_id, n, deadline, layerwise)
    first = await pair.prefill.prefill.remote(rid, prompt, SamplingSpec(max_tokens=1, temperature=0.0),
                                              to_params(send))
    recv = RecvSpec(rid, pair.prefill_id, n, deadline)
    async for ref in pair.decode.generate.remote(rid, prompt + first.token_ids,
                                                 SamplingSpec(max_tokens=1, temperature=0.0), to_params(recv)):
        await ref
    sent = await pair.prefill.transfer_record.remote("sent", rid, RECORD_TIMEOUT_S)
    if sent["error"]:
        raise RuntimeError(f"transfer {rid} failed: {sent['error']}")
    recv = await pair.decode.transfer_record.remote("recv", rid, RECORD_TIMEOUT_S)
    if not recv["ok"]:
        raise RuntimeError(f"transfer {rid} failed on the decode side: {recv['error']}")
    return sample_of(layerwise, sent, recv, first.compute)


async def _real(config: ServeConfig, prompt_tokens: int, requests: int) -> list[Sample]:
    from pdserve.cluster import deploy

    dep = await deploy(config)
    try:
        reg = dep.router.registry
        prefill = next(i for i in reg.all() if i.role == "prefill")
        decode = next(i for i in reg.all() if i.role == "decode")
        pair = Pair(prefill.handle, prefill.instance_id, decode.handle, decode.instance_id, decode.info.kv_address)
        rng = random.Random(0)
        samples = []
        for i in tqdm(range(2 * (requests + 1)), desc="requests", file=sys.stderr):
            prompt = [rng.randrange(100, 40_000) for _ in range(prompt_tokens)]
            sample = await transfer_sample(pair, f"bench-{i}", prompt, layerwise=i % 2 == 0)
            if i >= 2:  # one warm-up request per mode
                samples.append(sample)
        return samples
    finally:
        await dep.stop()


def layer_sends(samples: list[Sample], stall_factor: float = 3.0) -> dict[str, float]:
    """One layer's time inside send over all `samples`: p50, p99, and the share of the total spent in stalled
    sends (over `stall_factor` x the median), where the sender thread waited rather than moved bytes."""
    times = [t for s in samples for t in s.send_seconds]
    if not times:
        return {"p50_us": 0.0, "p99_us": 0.0, "stalled_share": 0.0}
    p50 = percentile(times, 50)
    return {
        "p50_us": p50 * 1e6,
        "p99_us": percentile(times, 99) * 1e6,
        "stalled_share": sum(t for t in times if t > stall_factor * p50) / sum(times),
    }


def delivered_median(values: list[float | None]) -> float | None:
    """The median of the samples that have a delivered figure; None when none has."""
    known = [v for v in values if v is not None]
    return percentile(known, 50) if known else None


def summarize(samples: list[Sample], raw: dict[str, Any], transport: str) -> dict[str, Any]:
    def med(values: list[float]) -> float:
        return percentile(values, 50)

    on = [s for s in samples if s.layerwise]
    off = [s for s in samples if not s.layerwise]
    raw_gbps = raw["raw"]["median"]
    kv_gbps = med([s.gbps for s in samples])
    return {
        "raw_gbps": raw_gbps,
        f"{transport}_gbps": raw[transport]["median"],
        "kv_gbps": kv_gbps,
        "kv_to_raw": kv_gbps / raw_gbps,
        "kv_gbps_layerwise": med([s.gbps for s in on]),
        "kv_gbps_whole": med([s.gbps for s in off]),
        "exposed_share_layerwise": med([s.exposed_share for s in on]),
        "exposed_share_whole": med([s.exposed_share for s in off]),
        "transfer_span_ms_layerwise": med([s.span_s * 1000 for s in on]),
        "transfer_span_ms_whole": med([s.span_s * 1000 for s in off]),
        "prefill_compute_ms": med([s.prefill_compute_s * 1000 for s in samples]),
        "kv_gbps_delivered_whole": delivered_median([s.delivered_gbps for s in off]),
        "exposed_share_delivered_layerwise": delivered_median([s.delivered_exposed_share for s in on]),
        "delivered_bounded": sum(s.landed_early for s in samples),
        "layer_sends_layerwise": layer_sends(on),
        "layer_sends_whole": layer_sends(off),
        "kv_bytes_per_request": med([float(s.bytes) for s in samples]),
        "samples": [dataclasses.asdict(s) for s in samples],
        "raw": raw,
    }


def main(args: argparse.Namespace) -> int:
    from pdserve_tools.bench.transport import measure

    config = config_from_dict(target_data(load_config(args.config), "pdserve-disagg", args.model))
    if args.prompt_tokens >= config.engine.max_model_len:
        raise SystemExit(f"--prompt-tokens must be below the model's max_model_len ({config.engine.max_model_len})")
    samples = asyncio.run(_real(config, args.prompt_tokens, args.requests))
    per_layer = samples[0].bytes // samples[0].layers
    raw = measure((config.transfer.transport,), size_bytes=per_layer, repeats=args.raw_repeats)
    result = summarize(samples, raw, config.transfer.transport)
    result.update(prompt_tokens=args.prompt_tokens, model=config.engine.model, layer_message_bytes=per_layer,
                  requests_per_mode=args.requests)
    _print(result, config.transfer.transport)
    print(f"wrote {write_json(args.out, result)}")
    return 0


def _print(r: dict[str, Any], transport: str) -> None:
    print(f"\n{r['requests_per_mode']} requests per mode, {r['prompt_tokens']} prompt tokens, "
          f"{r['kv_bytes_per_request'] / 1e6:.1f} MB of KV each, one message per layer "
          f"({r['layer_message_bytes'] / 1e6:.2f} MB)")
    rows = [
        ["raw loopback TCP", f"{r['raw_gbps']:.2f}", "1.00", ""],
        [f"{transport} transport (same messages)", f"{r[f'{transport}_gbps']:.2f}",
         f"{r[f'{transport}_gbps'] / r['raw_gbps']:.2f}", ""],
        ["KV of real requests, all", f"{r['kv_gbps']:.2f}", f"{r['kv_to_raw']:.2f}", ">= 0.8"],
        ["  layer-wise (sends share the core with the forward)", f"{r['kv_gbps_layerwise']:.2f}",
         f"{r['kv_gbps_layerwise'] / r['raw_gbps']:.2f}", ""],
        ["  whole (after the forward, back to back)", f"{r['kv_gbps_whole']:.2f}",
         f"{r['kv_gbps_whole'] / r['raw_gbps']:.2f}", ""],
    ]
    print(table(["bandwidth", "GB/s (median)", "ratio to raw", "goal"], rows))
    rows = [
        ["layer-wise streaming", f"{r['exposed_share_layerwise']:.2f}", f"{r['transfer_span_ms_layerwise']:.1f}",
         "<= 0.3"],
        ["whole KV after the forward", f"{r['exposed_share_whole']:.2f}", f"{r['transfer_span_ms_whole']:.1f}", ""],
    ]
    print(table(["mode", "exposed share", "transfer span ms", "goal"], rows))
    rows = [[mode, f"{r[key]['p50_us']:.0f}", f"{r[key]['p99_us']:.0f}", f"{r[key]['stalled_share']:.2f}"]
            for mode, key in (("layer-wise", "layer_sends_layerwise"), ("whole", "layer_sends_whole"))]
    print(table(["one layer's send", "p50 us", "p99 us", "share of send time in stalls (> 3x p50)"], rows))
    print(f"prefill compute (median): {r['prefill_compute_ms']:.1f} ms")
    delivered, exposed = r["kv_gbps_delivered_whole"], r["exposed_share_delivered_layerwise"]
    print("delivered (until the decode had the last layer): whole KV "
          f"{'-' if delivered is None else f'{delivered:.2f}'} GB/s, layer-wise exposed share "
          f"{'-' if exposed is None else f'{exposed:.2f}'}; {r['delivered_bounded']} of {len(r['samples'])} samples "
          "landed before the decode posted its blocks (bounds only)")
