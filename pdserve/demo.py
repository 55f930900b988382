"""`pdserve demo`: bring up a local cluster, stream answers to a few chat prompts, print their timings, stop.

Each answer ends with TTFT and TPOT and the request's phase breakdown (router queue, prefill queue and compute,
KV transfer, decode queue, first decode step, decode), as the final gRPC message carries them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time

from pdserve.cluster import deploy
from pdserve.config import ServeConfig
from pdserve_client import AsyncClient

PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Give me three tips for writing clear code.",
    "Explain in two sentences what a KV cache is in a language model.",
)


PHASES = ("router_queue", "prefill_queue", "prefill_compute", "kv_transfer", "decode_queue", "first_decode_step",
          "decode")


def _print(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


async def run_demo(config: ServeConfig, max_tokens: int = 96) -> int:
    config = dataclasses.replace(
        config,
        ray=dataclasses.replace(config.ray, log_to_driver=False),
        router=dataclasses.replace(config.router, port=0, http_port=0, metrics_port=0),
    )
    started = time.monotonic()
    layout = config.workers.layout()
    _print(f"starting {layout} instance(s) of {config.engine.model} ...\n")
    deployment = await deploy(config)
    _print(f"ready in {time.monotonic() - started:.1f} s, serving gRPC on {deployment.target}\n")
    try:
        async with AsyncClient(deployment.target) as client:
            for prompt in PROMPTS:
                _print(f"\n>>> {prompt}\n")
                final = None
                async for chunk in client.generate(
                    [{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0, timeout=120
                ):
                    _print(chunk.text)
                    final = chunk.final or final
                assert final is not None
                t = final.timings
                tpot = final.time_per_output_token
                _print(
                    f"\n[{final.prefill_instance} -> {final.decode_instance}] {final.completion_tokens} tokens, "
                    f"finish={final.finish_reason}, TTFT {t.time_to_first_token * 1000:.0f} ms, "
                    f"TPOT {tpot * 1000:.1f} ms, total {t.end_to_end:.2f} s\n"
                )
                _print("  " + "  ".join(f"{name} {getattr(t, name) * 1000:.1f}" for name in PHASES) + "  (ms)\n")
    finally:
        await deployment.stop()
    return 0


def main(config: ServeConfig) -> int:
    return asyncio.run(run_demo(config))
