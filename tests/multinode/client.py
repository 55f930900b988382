"""A client run inside node A's network namespace: completes test prompts through the SDK, greedily, one at a time,
and reads the router's /metrics before and after. Prints one JSON line:
{"completions": [...], "metrics_before": "<exposition text>", "metrics": "<exposition text>"}.

    python -m tests.multinode.client --target 127.0.0.1:50051 --metrics-port 9400 --max-tokens 24 1 4 6
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import urllib.request

from pdserve_client import Client
from tests.integration.conftest import prompts


def read_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        return str(response.read().decode())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("indices", type=int, nargs="+")
    args = parser.parse_args()
    metrics_before = read_metrics(args.metrics_port)
    completions = []
    with Client(args.target) as client:
        for index in args.indices:
            start = time.monotonic()
            done = client.complete(prompts()[index], max_tokens=args.max_tokens, temperature=0.0, timeout=180)
            assert done.final is not None
            completions.append({"index": index, "token_ids": done.token_ids, "wall_s": time.monotonic() - start,
                                "final": dataclasses.asdict(done.final)})
    print(json.dumps({"completions": completions, "metrics_before": metrics_before,
                      "metrics": read_metrics(args.metrics_port)}))


if __name__ == "__main__":
    main()
