"""Greedy output through pdserve equals, token for token, one plain in-process vLLM engine's output.

The prompts span the KV block boundaries (the engine's block size is 128 tokens): one token, under a block,
exactly one block, one block plus one, many blocks, and close to the maximum length (where generation stops
at max_model_len). Requests go one at a time to both sides.
"""

from __future__ import annotations

import os
import random

import pytest
from pdserve_client import Client

from tests.conftest import TINY_ENGINE

pytestmark = pytest.mark.integration

BLOCK = 128
MAX_TOKENS = 24
LENGTHS = [1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17, 6 * BLOCK + 5, TINY_ENGINE["max_model_len"] - 10]


def prompts() -> list[list[int]]:
    rng = random.Random(1234)
    return [[rng.randrange(100, 49_000) for _ in range(n)] for n in LENGTHS]


@pytest.fixture(scope="module")
def reference(tiny_model) -> list[tuple[list[int], str]]:
    """Token ids and finish reason of a plain vLLM engine, one prompt at a time."""
    from vllm import LLM, SamplingParams

    saved = {k: os.environ.get(k) for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")}
    os.environ.update(VLLM_CPU_OMP_THREADS_BIND="0", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    try:
        llm = LLM(
            model=str(tiny_model),
            dtype="float32",
            max_model_len=TINY_ENGINE["max_model_len"],
            max_num_batched_tokens=TINY_ENGINE["max_num_batched_tokens"],
            kv_cache_memory_bytes=int(TINY_ENGINE["kv_cache_gib"] * 2**30),
            enforce_eager=True,
            seed=0,
        )
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
        results = []
        for ids in prompts():
            (out,) = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
            results.append((list(out.outputs[0].token_ids), out.outputs[0].finish_reason))
        llm.llm_engine.engine_core.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return results


def test_reference_outputs_are_not_degenerate(reference):
    # A random model that repeated one token would let a dropped or shifted token go unnoticed.
    for ids, _ in reference:
        assert len(set(ids)) > len(ids) // 2


@pytest.mark.parametrize("index", range(len(LENGTHS)), ids=[f"prompt{n}" for n in LENGTHS])
def test_greedy_tokens_equal_plain_vllm(deployment, reference, index):
    ids = prompts()[index]
    with Client(deployment.target) as client:
        done = client.complete(ids, max_tokens=MAX_TOKENS, temperature=0.0, timeout=120)
    expected_ids, expected_reason = reference[index]
    assert done.token_ids == expected_ids
    assert done.final.finish_reason == expected_reason
    assert done.final.prompt_tokens == len(ids)
