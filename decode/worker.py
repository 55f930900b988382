"""`DecodeWorker`: the Ray actor that hosts one vLLM engine and streams a request's tokens.

In colocated mode each instance runs whole requests (prompt and continuation). The actor is a thin shell:
`generate` is a streaming actor method yielding `EngineChunk`s; cancelling the Ray task (the router does so
when its client goes away) or calling `abort` stops the request in the engine within one step.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

from pdserve.config import EngineConfig
from pdserve.engine import Engine, EngineChunk, EngineInfo, EngineStats
from pdserve.router.request import SamplingSpec


class DecodeWorker:
    def __init__(self, instance_id: str, config: EngineConfig, model_dir: str) -> None:
        self.instance_id = instance_id
        self._config = config
        self._model_dir = Path(model_dir)
        self._engine: Engine | None = None

    async def start(self) -> EngineInfo:
        """Builds the engine (tens of seconds); called once before any request."""
        if self._engine is None:
            self._engine = Engine(self._config, self._model_dir)
        return self._engine.info

    def _ready(self) -> Engine:
        if self._engine is None:
            raise RuntimeError(f"{self.instance_id}: start() was not called")
        return self._engine

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec
    ) -> AsyncIterator[EngineChunk]:
        async for chunk in self._ready().generate(request_id, prompt_token_ids, sampling):
            yield chunk

    async def abort(self, request_id: str) -> None:
        await self._ready().abort(request_id)

    async def stats(self) -> EngineStats:
        return self._ready().stats()

    async def wait_idle(self, timeout: float) -> EngineStats:
        return await self._ready().wait_idle(timeout)

    async def pid(self) -> int:
        return os.getpid()

    async def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
