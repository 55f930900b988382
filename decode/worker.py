"""`DecodeWorker`: the Ray actor that hosts one vLLM engine and streams a request's tokens.

Disaggregated mode: the engine is a KV consumer; a request arrives with its prompt plus the first token the
prefill sampled and a `RecvSpec`, waits in the engine until its KV landed, then decodes. The last chunk
carries the receive record. Colocated mode (and short prompts under conditional disaggregation): a request
runs whole. The router calls `generate` over the worker's request channel (`pdserve.channel`); cancelling
that call (the router does so when its client goes away) or calling `abort` stops the request in the engine
within one step.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from pdserve.engine import EngineChunk
from pdserve.host import EngineHost
from pdserve.kv_transfer.params import from_params
from pdserve.router.request import SamplingSpec


class DecodeWorker(EngineHost):
    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingSpec,
        kv_params: dict[str, Any] | None = None,
    ) -> AsyncIterator[EngineChunk]:
        engine = self._ready()
        spec = from_params(kv_params)
        async for chunk in engine.generate(request_id, prompt_token_ids, sampling, kv_params):
            if chunk.finish_reason is not None and spec is not None:
                chunk = replace(chunk, transfer=engine.transfer_record("recv", spec.transfer_id))
            yield chunk
