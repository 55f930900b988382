"""Engine glue: one vLLM `AsyncLLM` driven by token ids, as the workers use it.

Engines speak token ids only: the router tokenizes and detokenizes. `Engine.generate` yields one
`EngineChunk` per engine step with the tokens that step produced; the last chunk has a finish reason.
`Engine.stats` is the engine's latest scheduler report (running requests, KV usage), refreshed with every
step and when the engine goes idle.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.config import EngineConfig
from pdserve.router.request import SamplingSpec


@dataclass(frozen=True, slots=True)
class EngineInfo:
    max_model_len: int
    block_size: int
    num_blocks: int


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # share of KV blocks in use, 0.0 .. 1.0
    reports: int = 0  # scheduler reports seen; grows while the engine works

    @property
    def idle(self) -> bool:
        return self.running == 0 and self.waiting == 0 and self.kv_cache_usage == 0.0


@dataclass(frozen=True, slots=True)
class EngineChunk:
    """Tokens of one engine step. `prefill_compute` (seconds) rides on the first chunk only."""

    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length" or "abort" on the last chunk
    prefill_compute: float = 0.0


def _stats_logger(sink: list[EngineStats], changed: asyncio.Event) -> Any:
    """A vLLM stat logger that keeps the newest scheduler report in `sink[0]` and signals `changed`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class LatestStats(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                sink[0] = EngineStats(
                    running=scheduler_stats.num_running_reqs,
                    waiting=scheduler_stats.num_waiting_reqs,
                    kv_cache_usage=scheduler_stats.kv_cache_usage,
                    reports=sink[0].reports + 1,
                )
                changed.set()

        def log_engine_initialized(self) -> None:
            pass

    return LatestStats


def sampling_params(spec: SamplingSpec) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        max_tokens=spec.max_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        top_k=spec.top_k if spec.top_k > 0 else 0,
        seed=spec.seed,
        ignore_eos=spec.ignore_eos,
        stop_token_ids=list(spec.stop_token_ids),
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
    )


class Engine:
    """An `AsyncLLM` over a model folder; create and use it inside one running event loop."""

    def __init__(self, config: EngineConfig, model_dir: Path) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(model_dir),
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            block_size=config.block_size,
            seed=config.seed,
            enforce_eager=not config.compile,
            kv_cache_memory_bytes=int(config.kv_cache_gib * 2**30),
            enable_log_requests=False,
        )
        self._stats: list[EngineStats] = [EngineStats()]
        self._stats_changed = asyncio.Event()
        self._llm = AsyncLLM.from_engine_args(args, stat_loggers=[_stats_logger(self._stats, self._stats_changed)])
        cache = self._llm.vllm_config.cache_config
        self.info = EngineInfo(
            max_model_len=self._llm.model_config.max_model_len,
            block_size=cache.block_size,
            num_blocks=cache.num_gpu_blocks or 0,
        )

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec
    ) -> AsyncIterator[EngineChunk]:
        first = True
        prompt = {"prompt_token_ids": prompt_token_ids}
        async for out in self._llm.generate(prompt, sampling_params(sampling), request_id):
            completion = out.outputs[0]
            prefill = 0.0
            if first and out.metrics is not None:
                m = out.metrics
                prefill = max(0.0, m.first_token_ts - m.scheduled_ts)
            first = False
            reason = completion.finish_reason if out.finished else None
            yield EngineChunk(list(completion.token_ids), reason, prefill)

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    def stats(self) -> EngineStats:
        return self._stats[0]

    async def wait_idle(self, timeout: float) -> EngineStats:
        """Returns the first report with no request left and every KV block free; TimeoutError after `timeout`."""
        async with asyncio.timeout(timeout):
            while not (s := self._stats[0]).idle:
                self._stats_changed.clear()
                await self._stats_changed.wait()
        return s

    def shutdown(self) -> None:
        self._llm.shutdown()

