"""`EngineHost`: what every worker actor does with its engine: start it, open its request channel, report on it,
abort, shut down.

`PrefillWorker` (prefill/) and `DecodeWorker` (decode/) build on it: each names the request-channel methods it
serves (`handlers`) and may finish its own start (`_started`). The engine is built in `start` (tens of seconds),
not in the constructor, so the cluster starts every actor's engine at once.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray

from common.channel import fields
from common.histogram import Tally
from common.loop_lag import LAG_BUCKETS, LoopLag
from common.results import EngineChunk, EngineInfo, EngineStats
from common.sampling import SamplingSpec
from kv_transfer.transport import SECRET_ENV
from worker.affinity import bind_process
from worker.binding import Binding
from worker.channel_server import Call, ChannelServer, Handler, serve
from worker.config import EngineConfig
from worker.engine import Engine, KVRole


class EngineHost:
    def __init__(self, instance_id: str, config: EngineConfig, model_dir: str, kv: KVRole | None = None,
                 channel_port: int = 0) -> None:
        self.instance_id = instance_id
        self._channel_port = channel_port  # 0: any free port
        self._config = config
        self._model_dir = Path(model_dir)
        self._kv = kv
        self._engine: Engine | None = None
        self._server: ChannelServer | None = None
        self._lag = Tally(LAG_BUCKETS)
        self._lag_sampler: LoopLag | None = None

    def handlers(self) -> dict[str, Handler]:
        """The request-channel methods this worker serves, by name."""
        raise NotImplementedError

    async def _started(self, engine: Engine) -> None:
        """The role's own start, once the engine runs (a decode worker learns its KV receive address)."""

    async def node(self) -> tuple[str, int]:
        """Where Ray placed this actor: its node's id and core count (for `worker.binding.bind_node`)."""
        return ray.get_runtime_context().get_node_id(), os.cpu_count() or 1

    async def start(self, binding: Binding | None = None) -> EngineInfo:
        """Builds the engine (its threads on `binding`'s engine cores, when given) and opens the request channel;
        called before any request, and again by the supervisor after Ray restarted the actor (a no-op on a running
        one)."""
        if self._engine is None:
            if binding is not None:  # the engine's processes, started below, read it
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding.omp_bind()
            kv = self._kv
            if kv is not None:
                # Every start is a new incarnation: its KV links fence the older ones out. The connector runs in
                # the engine's own process: it learns here on which node, at which address, the actor runs.
                kv = dataclasses.replace(kv, settings=dataclasses.replace(
                    kv.settings, epoch=time.time_ns() // 1_000_000, node_id=ray.get_runtime_context().get_node_id(),
                    node_ip=ray.util.get_node_ip_address()))
            engine = Engine(self._config, self._model_dir, kv)
            await self._started(engine)
            self._server, address = await serve(self.handlers(), ray.util.get_node_ip_address(),
                                                os.environ[SECRET_ENV], self._channel_port)
            engine.info = dataclasses.replace(engine.info, request_address=address)
            self._engine = engine
            self._lag_sampler = LoopLag(self._lag.observe)  # this actor's loop serves every request's chunks
            self._lag_sampler.start()
            # Bound only now: the engine's processes, started above, must not inherit these cores.
            if binding is not None and binding.spare_cores:
                bind_process(set(binding.spare_cores))
        return self._engine.info

    async def generate_call(self, call: Call) -> AsyncIterator[dict[str, Any]]:
        """The `Generate` method: one `{"chunk"}` frame per engine step, the last with a finish reason, or
        `{"end": true}` when the engine ended the request without one."""
        finished = False
        async for chunk in self.generate(call.request_id, call.prompt_token_ids, call.sampling, call.kv_params):
            finished = chunk.finish_reason is not None
            yield {"chunk": fields(chunk)}
        if not finished:
            yield {"end": True}

    def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec,
                 kv_params: dict[str, Any] | None = None) -> AsyncIterator[EngineChunk]:
        """The request's tokens, one chunk per engine step (the whole request on this engine)."""
        return self._ready().generate(request_id, prompt_token_ids, sampling, kv_params)

    def _ready(self) -> Engine:
        if self._engine is None:
            raise RuntimeError(f"{self.instance_id}: start() was not called")
        return self._engine

    async def abort(self, request_id: str) -> None:
        await self._ready().abort(request_id)

    async def stats(self) -> EngineStats:
        engine = self._ready()
        return dataclasses.replace(engine.stats(), loop_lag=self._lag.histogram(), step_time=engine.step_times())

    async def wait_idle(self, timeout: float) -> EngineStats:
        return await self._ready().wait_idle(timeout)

    async def kv_state(self) -> dict[str, int]:
        """Our KV connector's state in the engine: transfers in progress, bytes held in receive buffers."""
        return await self._ready().kv_state()

    async def transfer_record(self, kind: str, transfer_id: str, timeout: float) -> dict[str, object]:
        """The connector's record of one finished transfer: "sent" (prefill) or "recv" (decode)."""
        return await self._ready().wait_transfer_record(kind, transfer_id, timeout)

    async def pid(self) -> int:
        return os.getpid()

    async def shutdown(self) -> None:
        if self._lag_sampler is not None:
            await self._lag_sampler.stop()
            self._lag_sampler = None
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
