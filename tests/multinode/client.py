"""A client run inside node A's network namespace: completes test prompts through the SDK, greedily, and reads the
router's /metrics before and after. A prompt is an index in `tests.integration.conftest.prompts()`, or `chat` (the
messages `CHAT`, through the chat template). One at a time by default; `--concurrent` streams them all at once and
prints the line `STARTED` once every stream has its first token (a test acts on the cluster then). Last, one JSON
line: {"completions": [{"index", "token_ids", "wall_s", "final"}], "metrics_before": "...", "metrics": "..."}.

    python -m tests.multinode.client --target 127.0.0.1:50051 --metrics-port 9400 --max-tokens 24 1 4 6 chat
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time
import urllib.request
from typing import Any

from pdserve_client import AsyncClient, Client
from tests.integration.conftest import prompts

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
STARTED = "STARTED"


def prompt(spec: str) -> Any:
    return CHAT if spec == "chat" else prompts()[int(spec)]


def read_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        return str(response.read().decode())


def record(spec: str, token_ids: list[int], wall_s: float, final: Any) -> dict[str, Any]:
    return {"index": spec if spec == "chat" else int(spec), "token_ids": token_ids, "wall_s": wall_s,
            "final": dataclasses.asdict(final)}


def one_at_a_time(target: str, specs: list[str], sampling: dict[str, Any]) -> list[dict[str, Any]]:
    done = []
    with Client(target) as client:
        for spec in specs:
            start = time.monotonic()
            completion = client.complete(prompt(spec), timeout=180, **sampling)
            assert completion.final is not None
            done.append(record(spec, completion.token_ids, time.monotonic() - start, completion.final))
    return done


async def all_at_once(target: str, specs: list[str], sampling: dict[str, Any]) -> list[dict[str, Any]]:
    started = [asyncio.Event() for _ in specs]

    async def one(client: AsyncClient, i: int) -> dict[str, Any]:
        start, tokens, final = time.monotonic(), [], None
        async for chunk in client.generate(prompt(specs[i]), timeout=180, **sampling):
            tokens += chunk.token_ids
            final = chunk.final or final
            started[i].set()
        return record(specs[i], tokens, time.monotonic() - start, final)

    async with AsyncClient(target) as client:
        tasks = [asyncio.create_task(one(client, i)) for i in range(len(specs))]
        await asyncio.gather(*(e.wait() for e in started))
        print(STARTED, flush=True)
        return list(await asyncio.gather(*tasks))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--concurrent", action="store_true")
    parser.add_argument("specs", nargs="+")
    args = parser.parse_args()
    sampling = {"max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": args.ignore_eos}
    metrics_before = read_metrics(args.metrics_port)
    if args.concurrent:
        completions = asyncio.run(all_at_once(args.target, args.specs, sampling))
    else:
        completions = one_at_a_time(args.target, args.specs, sampling)
    print(json.dumps({"completions": completions, "metrics_before": metrics_before,
                      "metrics": read_metrics(args.metrics_port)}))


if __name__ == "__main__":
    main()
