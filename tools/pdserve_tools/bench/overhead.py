"""`pdserve bench overhead`: what the frontend, router and request channel add to a request, against the engine
in-process.

Baseline: the same engine glue called in this process. Candidate: the SDK -> gRPC -> router -> request channel ->
engine (in a Ray actor) path of a one-instance deployment. Both engines load the same model with their threads
bound to the same core (core 0; the two never run at once: requests alternate baseline, candidate, baseline,
...), so that neither a faster core nor machine noise favours one side. What runs beside each engine is bound
to the other cores: the worker actor's threads (as in every deployment with cores to spare), and this process
(SDK, router, the baseline's engine client) once everything has started.
The overhead of a request is candidate latency minus the baseline latency of its pair; its median is the
figure to quote.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pdserve.config import EngineConfig, ServeConfig, config_from_dict
from pdserve.models import cache_dir
from pdserve_tools.bench.report import table, write_json
from pdserve_tools.slo import tpot
from pdserve_tools.stats import median_interval, percentile
from pdserve_tools.tiny_model import make_tiny_llama
from worker.affinity import bind_process
from worker.binding import bind_node

PROMPT_TOKENS = 16
# vLLM's engine processes keep polling (spinning on their shared-memory queues) for 1 s after their last step.
# Each request starts only once the other path's engine has gone quiet, so neither pays for the other's spin.
QUIET_S = 1.2


async def _baseline(engine: object, request_id: str, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    from router.request import SamplingSpec

    sampling = SamplingSpec(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    first = 0.0
    async for chunk in engine.generate(request_id, prompt, sampling):  # type: ignore[attr-defined]
        if not first and chunk.token_ids:
            first = time.perf_counter() - start
    return first, time.perf_counter() - start


async def _candidate(client: object, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    start = time.perf_counter()
    first = 0.0
    async for chunk in client.generate(  # type: ignore[attr-defined]
        prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, timeout=120
    ):
        if not first and chunk.token_ids:
            first = time.perf_counter() - start
    return first, time.perf_counter() - start


async def run(config: ServeConfig, requests: int, max_tokens: int) -> dict[str, object]:
    from pdserve.cluster import deploy
    from pdserve_client import AsyncClient
    from worker.engine import Engine

    # The baseline engine loads first: loading blocks this event loop, which the router's heartbeats share.
    os.environ.update(VLLM_CPU_OMP_THREADS_BIND="0", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    engine = Engine(config.engine, Path(config.engine.model))
    try:
        deployment = await deploy(config)  # its one worker binds core 0 too
    except BaseException:
        engine.shutdown()
        raise
    bind_process(set(bind_node([1], os.cpu_count() or 1)[0].spare_cores))  # the core its one worker's engine leaves
    rng = random.Random(0)
    samples: dict[str, list[tuple[float, float]]] = {"baseline": [], "candidate": []}
    try:
        async with AsyncClient(deployment.target) as client:
            for i in tqdm(range(requests + 3), desc="requests", file=sys.stderr):
                prompt = [rng.randrange(100, 40_000) for _ in range(PROMPT_TOKENS)]
                await asyncio.sleep(QUIET_S)
                b = await _baseline(engine, f"b{i}", prompt, max_tokens)
                await asyncio.sleep(QUIET_S)
                c = await _candidate(client, prompt, max_tokens)
                if i >= 3:  # the first pairs warm both paths up
                    samples["baseline"].append(b)
                    samples["candidate"].append(c)
    finally:
        engine.shutdown()
        await deployment.stop()
    return summarize(samples, max_tokens)


def summarize(samples: dict[str, list[tuple[float, float]]], max_tokens: int) -> dict[str, object]:
    base, cand = samples["baseline"], samples["candidate"]
    overhead = [c[1] - b[1] for b, c in zip(base, cand, strict=True)]
    ttft_overhead = [c[0] - b[0] for b, c in zip(base, cand, strict=True)]
    p50 = {name: percentile([s[1] for s in xs], 50) for name, xs in samples.items()}
    return {
        "requests": len(base),
        "baseline_e2e_p50_s": p50["baseline"],
        "candidate_e2e_p50_s": p50["candidate"],
        "ratio_e2e_p50": p50["candidate"] / p50["baseline"],
        "overhead_p50_s": percentile(overhead, 50),
        # The spread of single requests is much wider than the overhead itself: say how well the median is known.
        "overhead_p50_ci95_s": median_interval(overhead, 0.95),
        "overhead_p90_s": percentile(overhead, 90),
        "ttft_overhead_p50_s": percentile(ttft_overhead, 50),
        # What each token after the first adds: the TPOT of the overhead (NaN for one-token requests).
        "per_token_overhead_p50_s": percentile(
            [t for o, f in zip(overhead, ttft_overhead, strict=True) if (t := tpot(f, o, max_tokens)) is not None], 50
        ),
        "max_tokens": max_tokens,
        "samples": samples,
    }


def main(args: argparse.Namespace) -> int:
    model = args.model
    if model is None:
        model = str(make_tiny_llama(cache_dir() / "models" / "tiny-llama-bench"))
    engine = dataclasses.asdict(EngineConfig(model=model, max_model_len=512, max_num_batched_tokens=512,
                                             kv_cache_gib=0.25, compile=False))
    config = config_from_dict(
        {"engine": engine, "workers": {"mode": "colocated", "colocated": {"instances": 1}},
         "router": {"port": 0, "http_port": 0, "metrics_port": 0},
         "ray": {"num_cpus": os.cpu_count() or 2, "log_to_driver": False}}
    )
    result: dict[str, Any] = asyncio.run(run(config, args.requests, args.max_tokens))
    rows = [
        ["engine in-process (baseline)", result["baseline_e2e_p50_s"] * 1000, 1.0],
        ["SDK+gRPC+router+channel (pdserve)", result["candidate_e2e_p50_s"] * 1000, result["ratio_e2e_p50"]],
    ]
    lo, hi = result["overhead_p50_ci95_s"]
    print(f"\n{result['requests']} requests of {PROMPT_TOKENS} prompt tokens, {args.max_tokens} output tokens, greedy")
    print(table(["path", "e2e p50 ms", "ratio"], rows))
    print(
        f"overhead per request: p50 {result['overhead_p50_s'] * 1000:.2f} ms "
        f"(95% interval {lo * 1000:.2f} to {hi * 1000:.2f} ms), "
        f"p90 {result['overhead_p90_s'] * 1000:.2f} ms; of which first token p50 "
        f"{result['ttft_overhead_p50_s'] * 1000:.2f} ms, each further token p50 "
        f"{result['per_token_overhead_p50_s'] * 1000:.2f} ms"
    )
    print(f"wrote {write_json(args.out, result)}")
    return 0


