"""The measuring end of `pdserve bench multinode`: run in the router's namespace, against a running `pdserve serve`.

    python -m pdserve_tools.bench.multinode_probe --address 10.213.0.1:6379 --namespace NS \
        --target 127.0.0.1:PORT --metrics-url http://127.0.0.1:PORT/metrics --prompt-tokens 512 --requests 6

1. As a second Ray driver it finds the deployment's two workers (named actors of the Ray namespace) and drives them
   directly, as `pdserve bench transfer` does: `requests` prompts prefilled on the prefill worker with layer-wise
   streaming and `requests` with the whole KV sent after the forward (alternating, after one warm-up of each),
   their KV sent to the decode worker; the connectors' records of each send and each load (the two nodes are
   namespaces of one machine: one wall clock).
2. Through the router (gRPC, from this namespace, as a client would): `requests` more prompts (after one warm-up),
   one at a time, greedy, `max_tokens` each with EOS ignored; each one's TTFT and TPOT as the client saw them and
   the per-phase timings the router returned (`kv_transfer`: how long the decode waited for KV).
3. The router's /metrics text before step 2 and at the end (its KV transfer counters, the engines' step times).

Prints one JSON line: {"instances": [{"instance_id", "role", "pid"}], "samples": [transfer `Sample`s],
"served": [{"ttft_s", "tpot_s", "tokens", "timings", "prefill_instance", "decode_instance", "error"}],
"metrics_before": "<exposition text>", "metrics": "<exposition text>"}. Progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import sys
import time
import urllib.request
from typing import Any

from tqdm import tqdm

from pdserve_tools.bench.transfer import Pair, Sample, transfer_sample

TOKEN_RANGE = (100, 40_000)  # ids every model here has


def prompts(seed: int, count: int, tokens: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(*TOKEN_RANGE) for _ in range(tokens)] for _ in range(count)]


def workers(namespace: str) -> list[dict[str, Any]]:
    """The deployment's workers: instance id, role, actor handle, engine info, process id."""
    import ray

    found = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] != namespace:
            continue
        handle = ray.get_actor(actor["name"], namespace=namespace)
        instance_id = actor["name"].partition("@")[0]
        found.append({"instance_id": instance_id, "role": instance_id.rpartition("-")[0], "handle": handle,
                      "info": ray.get(handle.start.remote()),  # a running worker's info: a no-op start
                      "pid": ray.get(handle.pid.remote())})
    return sorted(found, key=lambda w: w["instance_id"])


async def transfers(pair: Pair, requests: int, prompt_tokens: int) -> list[Sample]:
    samples = []
    count = 2 * (requests + 1)
    for i, prompt in enumerate(tqdm(prompts(1, count, prompt_tokens), desc="KV transfers", file=sys.stderr)):
        sample = await transfer_sample(pair, f"mn-{time.time_ns()}-{i}", prompt, layerwise=i % 2 == 0)
        if i >= 2:  # the first of each mode is a warm-up
            samples.append(sample)
    return samples


def one_request(client: Any, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    sent = time.monotonic()
    times: list[float] = []
    tokens = 0
    final = None
    try:
        for chunk in client.generate(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, timeout=300):
            if chunk.token_ids:
                times.append(time.monotonic())
                tokens += len(chunk.token_ids)
            final = chunk.final or final
    except Exception as e:  # a failed request is part of the result
        return {"error": f"{type(e).__name__}: {e}", "tokens": tokens}
    if final is None or not times:
        return {"error": "the stream ended without tokens or a final message", "tokens": tokens}
    return {"ttft_s": times[0] - sent, "tpot_s": (times[-1] - times[0]) / (tokens - 1) if tokens > 1 else 0.0,
            "tokens": tokens, "timings": dataclasses.asdict(final.timings), "error": "",
            "prefill_instance": final.prefill_instance, "decode_instance": final.decode_instance}


def served(target: str, requests: int, prompt_tokens: int, max_tokens: int) -> list[dict[str, Any]]:
    from pdserve_client import Client

    with Client(target) as client:
        done = [one_request(client, prompt, max_tokens)
                for prompt in tqdm(prompts(2, requests + 1, prompt_tokens), desc="requests", file=sys.stderr)]
    return done[1:]  # the first is a warm-up


def read_metrics(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return str(response.read().decode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True, help="the Ray cluster's head")
    parser.add_argument("--namespace", required=True, help="the deployment's Ray namespace")
    parser.add_argument("--target", required=True, help="the router's gRPC address")
    parser.add_argument("--metrics-url", required=True)
    parser.add_argument("--prompt-tokens", type=int, required=True)
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    import ray

    ray.init(address=args.address, namespace=args.namespace, log_to_driver=False)
    found = workers(args.namespace)
    prefill = next(w for w in found if w["role"] == "prefill")
    decode = next(w for w in found if w["role"] == "decode")
    pair = Pair(prefill["handle"], prefill["instance_id"], decode["handle"], decode["instance_id"],
                decode["info"].kv_address)
    samples = asyncio.run(transfers(pair, args.requests, args.prompt_tokens))
    ray.shutdown()
    before = read_metrics(args.metrics_url)
    answers = served(args.target, args.requests, args.prompt_tokens, args.max_tokens)
    print(json.dumps({
        "instances": [{k: w[k] for k in ("instance_id", "role", "pid")} for w in found],
        "samples": [dataclasses.asdict(s) for s in samples],
        "served": answers,
        "metrics_before": before,
        "metrics": read_metrics(args.metrics_url),
    }))


if __name__ == "__main__":
    main()
