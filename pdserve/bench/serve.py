"""`pdserve bench serve`: open-loop serving benchmark, targets run one after another on the same cores.

Each target is started by the benchmark, warmed up, driven with the same requests at the same arrival times
(Poisson, or gamma with a burstiness factor, as vLLM's benchmark does), and stopped. Every request streams
through the gRPC SDK; the client-side trace of each (send time, every chunk's arrival and token count) goes to
`serve_metrics`, which computes TTFT, TPOT, ITL, end-to-end latency and goodput with vLLM's definitions.

Targets:
- `pdserve-disagg`: 1P1D (one prefill and one decode instance, one core each).
- `pdserve-colocated`: two colocated instances (one core each), the same router.

    pdserve bench serve --rate 1.0 --requests 60 [--model PATH] [--slo-ttft-ms 2000 --slo-tpot-ms 200]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from typing import Any

from tqdm import tqdm

from pdserve.bench.report import table, write_json
from pdserve.bench.serve_metrics import RequestTrace, ServeMetrics, Slo, summarize
from pdserve.bench.workload import ArrivalConfig, BenchRequest, LengthDist, RandomConfig, arrival_times, random_requests
from pdserve.config import ServeConfig, config_from_dict, load_config

TARGETS = {
    "pdserve-disagg": {"mode": "disaggregated", "prefill_instances": 1, "decode_instances": 1},
    "pdserve-colocated": {"mode": "colocated", "instances": 2},
}
REFERENCE = "pdserve-disagg"
WARMUP = 2


def mixed_workload(count: int, max_model_len: int, seed: int) -> list[BenchRequest]:
    """Short and long prompts, short and long outputs: lognormal lengths with a wide spread."""
    cap = max_model_len // 2
    return random_requests(RandomConfig(
        count=count,
        input=LengthDist(200, "lognormal", 1.0, low=8, high=cap),
        output=LengthDist(48, "lognormal", 0.8, low=4, high=min(256, cap)),
        token_range=(100, 40_000),
        seed=seed,
    ))


async def _one(client: Any, request: BenchRequest, send_at: float, timeout: float) -> RequestTrace:
    await asyncio.sleep(max(0.0, send_at - time.monotonic()))  # the open-loop schedule, not a synchronization
    sent = time.monotonic()
    times: list[float] = []
    tokens: list[int] = []
    try:
        async for chunk in client.generate(list(request.prompt), max_tokens=request.max_tokens, temperature=0.0,
                                           ignore_eos=True, timeout=timeout):
            if chunk.token_ids:
                times.append(time.monotonic())
                tokens.append(len(chunk.token_ids))
    except Exception as e:  # a failed request is part of the result, counted by its error
        return RequestTrace(sent, tuple(times), tuple(tokens), request.prompt_tokens, error=type(e).__name__)
    return RequestTrace(sent, tuple(times), tuple(tokens), request.prompt_tokens)


async def run_target(config: ServeConfig, requests: list[BenchRequest], arrivals: tuple[float, ...],
                     timeout: float, label: str) -> tuple[list[RequestTrace], float]:
    from pdserve_client import AsyncClient

    from pdserve.cluster import deploy

    dep = await deploy(config)
    try:
        async with AsyncClient(dep.target) as client:
            for r in requests[:WARMUP]:
                await _one(client, r, 0.0, timeout)
            start = time.monotonic()
            bar = tqdm(total=len(requests), desc=label, file=sys.stderr)

            async def tracked(r: BenchRequest, at: float) -> RequestTrace:
                trace = await _one(client, r, start + at, timeout)
                bar.update()
                return trace

            traces = await asyncio.gather(*(tracked(r, at) for r, at in zip(requests, arrivals, strict=True)))
            bar.close()
            return list(traces), time.monotonic() - start
    finally:
        await dep.stop()


def target_config(base: ServeConfig, workers: dict[str, Any], model: str | None) -> ServeConfig:
    data = {
        "ray": {"num_cpus": max(4, os.cpu_count() or 2), "log_to_driver": False},
        "engine": dataclasses.asdict(base.engine) | ({"model": model} if model else {}),
        "workers": workers,
        "transfer": dataclasses.asdict(base.transfer),
        "router": {"port": 0, "http_port": 0, "metrics_port": 0, "max_tokens_limit": base.router.max_tokens_limit},
    }
    return config_from_dict(data)


def rows(results: dict[str, ServeMetrics]) -> list[list[object]]:
    ref = results.get(REFERENCE)
    out: list[list[object]] = []
    for name, m in results.items():
        def ratio(mine: float | None, theirs: float | None) -> str:
            return f"{mine / theirs:.2f}" if mine and theirs else "-"

        out.append([
            name, m.completed, m.failed,
            f"{m.ttft.median * 1000:.0f}", f"{m.ttft.at(99) * 1000:.0f}",
            f"{m.tpot.median * 1000:.0f}", f"{m.tpot.at(99) * 1000:.0f}",
            f"{m.request_goodput:.3f}" if m.request_goodput is not None else "-",
            f"{m.slo_attainment:.2f}" if m.slo_attainment is not None else "-",
            ratio(m.request_goodput, ref.request_goodput if ref else None),
            ratio(m.tpot.at(99), ref.tpot.at(99) if ref else None),
        ])
    return out


HEADERS = ["target", "done", "failed", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms",
           "goodput req/s", "SLO met", f"goodput / {REFERENCE}", f"TPOT p99 / {REFERENCE}"]


def main(args: argparse.Namespace) -> int:
    base = load_config(args.config)
    configs = {name: target_config(base, TARGETS[name], args.model) for name in args.targets}
    any_config = next(iter(configs.values()))
    requests = mixed_workload(args.requests + WARMUP, any_config.engine.max_model_len, args.seed)
    arrivals = arrival_times(args.requests, ArrivalConfig(args.rate, args.burstiness, args.seed))
    slo = Slo(ttft_s=args.slo_ttft_ms / 1000, tpot_s=args.slo_tpot_ms / 1000)
    results: dict[str, ServeMetrics] = {}
    for name, config in configs.items():
        traces, duration = asyncio.run(run_target(config, requests[WARMUP:], arrivals, args.timeout, name))
        results[name] = summarize(traces, duration, slo)
    print(f"\n{args.requests} requests, Poisson-{args.burstiness:g} arrivals at {args.rate:g} req/s, mixed lengths; "
          f"SLO: TTFT <= {args.slo_ttft_ms:g} ms and TPOT <= {args.slo_tpot_ms:g} ms")
    print(table(HEADERS, rows(results)))
    out = {"args": {k: v for k, v in vars(args).items() if k != "func"},
           "results": {name: m.to_json() for name, m in results.items()}}
    print(f"wrote {write_json(args.out, out)}")
    return 0


def add_parser(bsub: Any, func: Any) -> None:
    b = bsub.add_parser("serve", help="open-loop serving benchmark: pdserve disaggregated vs colocated, same cores")
    b.add_argument("--config", help="a serve config whose engine and transfer sections the targets use")
    b.add_argument("--model", help="model folder or name (default: the config's)")
    b.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    b.add_argument("--rate", type=float, default=1.0, help="requests per second (inf: all at once)")
    b.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1 is Poisson")
    b.add_argument("--requests", type=int, default=60)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    b.add_argument("--slo-tpot-ms", type=float, default=200.0)
    b.add_argument("--timeout", type=float, default=600.0, help="per-request deadline, seconds")
    b.add_argument("--out", default="bench-results/serve.json")
    b.set_defaults(func=func)
