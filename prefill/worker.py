"""`PrefillWorker`: the Ray actor that hosts one vLLM engine in the KV producer role.

`prefill` runs a request's prompt (one output token) with a `SendSpec`: the engine's connector streams the
prompt's KV, layer by layer, to the decode instance named in the spec while the forward pass goes on. The call
returns the first token as soon as the engine has it; the engine keeps the KV blocks until the last byte left.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from pdserve.host import EngineHost
from pdserve.router.request import SamplingSpec


@dataclass(frozen=True, slots=True)
class PrefillResult:
    token_ids: list[int]  # the first output token (empty only if the engine aborted the request)
    finish_reason: str | None  # "stop" when the first token already ends the request
    engine_queue: float  # seconds queued in the engine
    compute: float  # seconds from scheduled to first token


class PrefillWorker(EngineHost):
    async def prefill(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec, kv_params: dict[str, Any]
    ) -> PrefillResult:
        one = replace(sampling, max_tokens=1)
        tokens: list[int] = []
        reason, queue, compute = None, 0.0, 0.0
        async for chunk in self._ready().generate(request_id, prompt_token_ids, one, kv_params):
            if not tokens:
                queue, compute = chunk.engine_queue, chunk.prefill_compute
            tokens += chunk.token_ids
            reason = chunk.finish_reason
        # With max_tokens=1 the engine says "length" unless the token itself stopped the request.
        return PrefillResult(tokens, "stop" if reason == "stop" else None, queue, compute)
