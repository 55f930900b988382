"""A 4 MiB prompt does not stall the router: while it is read, parsed and tokenized beside a running stream, the
router's event loop, which sends every stream's tokens, is never late by more than 100 ms.

The measure is the router's own `pdserve_event_loop_lag_seconds`, sampled every 100 ms on that loop: what blocks
the loop delays every token it would send, whatever the engines or the machine's load do to token timing itself.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from pdserve_client import Client
from tests.conftest import poll
from tests.integration.test_serving import scrape

pytestmark = pytest.mark.integration

PROMPT_BYTES = 4 << 20  # the router's default max_prompt_bytes: accepted, and tokenized in full
LAG = "pdserve_event_loop_lag_seconds"


def lag_samples(deployment: Any) -> tuple[float, float]:
    """How many loop-lag samples the router has taken, and how many of them were late by over 100 ms."""
    metrics = scrape(deployment)
    total = metrics[(f"{LAG}_count", ())]
    return total, total - metrics[(f"{LAG}_bucket", (("le", "0.1"),))]


def settled_lag_samples(deployment: Any) -> tuple[float, float]:
    """`lag_samples` once the router has taken two samples more than it had at the call: the one in progress at
    the call (late, if the loop was blocked just before) is then counted."""
    start = lag_samples(deployment)[0]

    def settled() -> tuple[float, float] | None:
        samples = lag_samples(deployment)
        return samples if samples[0] >= start + 2 else None

    return poll(settled, "two more loop-lag samples", timeout=30, period=0.05)


def post_completion(port: int, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_4_mib_prompt_does_not_delay_another_streams_tokens_by_100_ms(deployment):
    sentence = "Why is the sky blue on a clear day? "
    prompt = (sentence * (PROMPT_BYTES // len(sentence) + 1))[:PROMPT_BYTES]
    body = json.dumps({"model": "tiny-llama", "prompt": prompt, "max_tokens": 4}).encode()
    with Client(deployment.target) as client:
        stream = iter(client.generate([40, 41, 42], max_tokens=400, temperature=0.0, ignore_eos=True))
        assert next(stream).final is None  # the stream runs
        before = settled_lag_samples(deployment)
        start = time.monotonic()
        status, reply = post_completion(deployment.http_port, body)
        busy_s = time.monotonic() - start
        after = settled_lag_samples(deployment)
        assert next(stream).final is None  # and still runs
    # Read, parsed and tokenized in full, then refused: a million tokens do not fit the model.
    assert status == 400 and "tokens" in reply["error"]["message"], reply
    assert after[1] == before[1], f"{after[1] - before[1]:.0f} loop-lag samples over 100 ms while the prompt ran"
    assert busy_s >= 0.3, f"the prompt took {busy_s:.2f} s: too short a time to tell a blocked loop from a free one"
