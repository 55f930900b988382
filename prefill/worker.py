"""`PrefillWorker`: the Ray actor that hosts one vLLM engine in the KV producer role.

A prefill runs a request's prompt for one output token with a `SendSpec` in its KV params: the engine's connector
streams the prompt's KV, layer by layer, to the decode instance the spec names while the forward pass goes on.
The call returns the first token as soon as the engine has it (`PrefillResult`); the engine keeps the KV blocks
until the last byte has left.

Request channel: one method, `Prefill`, answered with one `{"result": PrefillResult}` frame. The router closing
the connection before the answer (its client went away, a deadline passed) cancels the handler, which stops the
request in the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from common.channel import fields
from common.results import PrefillResult
from common.sampling import SamplingSpec
from kv_transfer.config import ConnectorSettings, TransferConfig
from worker.channel_server import Call, Handler
from worker.engine import KVRole
from worker.host import EngineHost

KV_ROLE = "kv_producer"


def producer_role(instance_id: str, transfer: TransferConfig) -> KVRole:
    """The connector settings of a prefill instance; the worker stamps its epoch when it starts."""
    return KVRole(KV_ROLE, ConnectorSettings(instance_id, 0, transfer))


def first_token_result(tokens: list[int], finish_reason: str | None, queue: float, compute: float) -> PrefillResult:
    """What a one-token run means to the router: with max_tokens=1 the engine says "length" unless the token itself
    stopped the request, so only "stop" ends the request here."""
    return PrefillResult(tokens, "stop" if finish_reason == "stop" else None, queue, compute)


class PrefillWorker(EngineHost):
    def handlers(self) -> dict[str, Handler]:
        return {"Prefill": self._prefill_call}

    async def _prefill_call(self, call: Call) -> AsyncIterator[dict[str, Any]]:
        if call.kv_params is None:
            raise ValueError("a prefill needs KV params naming the decode instance its KV goes to")
        result = await self.prefill(call.request_id, call.prompt_token_ids, call.sampling, call.kv_params)
        yield {"result": fields(result)}

    async def prefill(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec, kv_params: dict[str, Any]
    ) -> PrefillResult:
        """Runs the prompt for its first token while the connector sends its KV as `kv_params` says."""
        one = replace(sampling, max_tokens=1)
        tokens: list[int] = []
        reason, queue, compute = None, 0.0, 0.0
        async for chunk in self._ready().generate(request_id, prompt_token_ids, one, kv_params):
            if not tokens:
                queue, compute = chunk.engine_queue, chunk.prefill_compute
            tokens += chunk.token_ids
            reason = chunk.finish_reason
        return first_token_result(tokens, reason, queue, compute)
