"""Engine glue: one vLLM `AsyncLLM` driven by token ids, as the workers use it.

Engines speak token ids only: the router tokenizes and detokenizes. `Engine.generate` yields one
`EngineChunk` per engine step with the tokens that step produced; the last chunk has a finish reason.
`Engine.stats` is the engine's latest scheduler report (running requests, KV usage), refreshed with every
step and when the engine goes idle; `Engine.step_times` the wall time of each engine step so far (`worker.steps`
says what a step covers), taken from the engine core's outputs as the frontend receives them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.histogram import Histogram, Tally
from common.results import EngineChunk, EngineInfo, EngineStats
from common.sampling import SamplingSpec
from kv_transfer.config import ConnectorSettings
from worker.config import EngineConfig, engine_args
from worker.steps import STEP_BUCKETS, StepClock, step_report

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KVRole:
    """An engine's part in disaggregated serving: `role` is vLLM's "kv_producer" or "kv_consumer"; `settings` tells
    our connector which incarnation it serves and how KV moves."""

    role: str
    settings: ConnectorSettings


MAX_TRANSFER_RECORDS = 4096


def _stats_logger(sink: list[EngineStats], changed: asyncio.Event, transfers: OrderedDict[str, Any]) -> Any:
    """A vLLM stat logger that keeps the newest scheduler report in `sink[0]` and signals `changed`.

    Our connector's per-transfer records ride on the same reports; they are kept by transfer id in `transfers`.
    """
    from vllm.v1.metrics.loggers import StatLoggerBase

    class LatestStats(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            preempted = iteration_stats.num_preempted_reqs if iteration_stats is not None else 0
            if preempted:
                sink[0] = dataclasses.replace(sink[0], preemptions=sink[0].preemptions + preempted)
            if scheduler_stats is not None:
                sink[0] = EngineStats(
                    running=scheduler_stats.num_running_reqs,
                    waiting=scheduler_stats.num_waiting_reqs,
                    kv_cache_usage=scheduler_stats.kv_cache_usage,
                    reports=sink[0].reports + 1,
                    preemptions=sink[0].preemptions,
                )
                for kind, records in (scheduler_stats.kv_connector_stats or {}).items():
                    for record in records if isinstance(records, list) else ():
                        transfers[f"{kind}:{record['transfer_id']}"] = record
                while len(transfers) > MAX_TRANSFER_RECORDS:
                    transfers.popitem(last=False)
                changed.set()

        def log_engine_initialized(self) -> None:
            pass

    return LatestStats


def _watch_steps(llm: Any, clock: StepClock) -> None:
    """Shows `clock` every output the engine core sends, on its way to the frontend's output handler (which looks
    `get_output_async` up on each pass; called right after the engine is built, before the handler first runs)."""
    client = llm.engine_core
    receive = client.get_output_async

    async def get_output_async() -> Any:
        outputs = await receive()
        try:
            if (step := step_report(outputs)) is not None:
                clock.report(step)
        except Exception:  # a measurement must never stop the outputs on their way
            log.exception("engine step timing failed; step times stop here")
            client.get_output_async = receive
        return outputs

    client.get_output_async = get_output_async


def sampling_params(spec: SamplingSpec, kv_params: dict[str, Any] | None = None) -> Any:
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
        extra_args={"kv_transfer_params": kv_params} if kv_params else None,
    )


class Engine:
    """An `AsyncLLM` over a model folder; create and use it inside one running event loop."""

    def __init__(self, config: EngineConfig, model_dir: Path, kv: KVRole | None = None) -> None:
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kv_config = None
        if kv is not None:
            kv_config = KVTransferConfig(
                kv_connector="PdConnector",
                kv_connector_module_path="kv_transfer.connector",
                kv_role=kv.role,  # type: ignore[arg-type]
                kv_connector_extra_config=kv.settings.to_extra(),
                kv_load_failure_policy="recompute",  # a failed transfer costs time, never the request
            )

        args = AsyncEngineArgs(
            **engine_args(config, str(model_dir)),
            enable_log_requests=False,
            kv_transfer_config=kv_config,
            worker_extension_cls="kv_transfer.control.KVControl" if kv is not None else "",
            # A consumer's blocks are written by transfers; prefix caching would share them across requests.
            enable_prefix_caching=False if kv is not None and kv.role == "kv_consumer" else None,
        )
        self._stats: list[EngineStats] = [EngineStats()]
        self._stats_changed = asyncio.Event()
        self._transfers: OrderedDict[str, Any] = OrderedDict()
        self._llm = AsyncLLM.from_engine_args(
            args, stat_loggers=[_stats_logger(self._stats, self._stats_changed, self._transfers)]
        )
        self._steps = Tally(STEP_BUCKETS)
        _watch_steps(self._llm, StepClock(self._steps.observe))
        self._kv = kv
        cache = self._llm.vllm_config.cache_config
        self.info = EngineInfo(
            max_model_len=self._llm.model_config.max_model_len,
            block_size=cache.block_size,
            num_blocks=cache.num_gpu_blocks or 0,
            kv_block_bytes=_block_bytes(self._llm.vllm_config),
            prefix_caching=bool(cache.enable_prefix_caching),
        )

    async def control(self, method: str, *args: Any) -> Any:
        """Calls our connector's worker role (`kv_transfer.control`) in the engine's worker process."""
        if self._kv is None:
            raise RuntimeError("this engine has no KV connector")
        (result,) = await self._llm.collective_rpc(method, args=args)
        return result

    async def kv_state(self) -> dict[str, int]:
        """Our connector's worker state: transfers in progress, bytes in receive buffers."""
        return {} if self._kv is None else dict(await self.control("pdkv_state"))

    def transfer_record(self, kind: str, transfer_id: str) -> dict[str, Any] | None:
        """The connector's record of a transfer, once its report arrived: "dial" (whether a prefill's link came up),
        "sent" (a prefill's send done) or "recv" (a decode's load done)."""
        return self._transfers.get(f"{kind}:{transfer_id}")

    async def wait_transfer_record(self, kind: str, transfer_id: str, timeout: float) -> dict[str, Any]:
        """Waits (on the engine's reports, no polling) for the record of a transfer; TimeoutError after `timeout`."""
        async with asyncio.timeout(timeout):
            while (record := self.transfer_record(kind, transfer_id)) is None:
                self._stats_changed.clear()
                await self._stats_changed.wait()
        return record

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingSpec,
        kv_params: dict[str, Any] | None = None,
    ) -> AsyncIterator[EngineChunk]:
        first = True
        prompt: Any = {"prompt_token_ids": prompt_token_ids}  # a TokensPrompt
        async for out in self._llm.generate(prompt, sampling_params(sampling, kv_params), request_id):
            completion = out.outputs[0]
            compute = queue = 0.0
            if first and out.metrics is not None:
                m = out.metrics
                compute = max(0.0, m.first_token_ts - m.scheduled_ts)
                queue = max(0.0, m.scheduled_ts - m.queued_ts)
            first = False
            reason = completion.finish_reason if out.finished else None
            yield EngineChunk(list(completion.token_ids), reason, compute, queue)

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    def stats(self) -> EngineStats:
        return self._stats[0]

    def step_times(self) -> Histogram:
        """Each engine step's wall time since the engine started, in seconds."""
        return self._steps.histogram()

    async def wait_idle(self, timeout: float) -> EngineStats:
        """Returns the first report with no request left and every KV block free; TimeoutError after `timeout`."""
        async with asyncio.timeout(timeout):
            while not (s := self._stats[0]).idle:
                self._stats_changed.clear()
                await self._stats_changed.wait()
        return s

    def shutdown(self) -> None:
        self._llm.shutdown()



def _block_bytes(vllm_config: Any) -> int:
    """Bytes of one KV block over all layers: what one block of a request costs to hold or to send."""
    import torch

    model, cache = vllm_config.model_config, vllm_config.cache_config
    parallel = vllm_config.parallel_config
    element = torch.empty((), dtype=model.dtype).element_size()
    per_token = 2 * model.get_num_layers(parallel) * model.get_num_kv_heads(parallel) * model.get_head_size()
    return int(per_token * element * cache.block_size)
