"""`DecodeWorker`: the Ray actor that hosts one vLLM engine and streams a request's tokens.

Disaggregated (KV consumer role): a request arrives with its prompt plus the first token the prefill sampled and
a `RecvSpec` in its KV params; it waits in the engine until its KV has landed, then decodes. The last chunk carries
the connector's receive record. KV that arrived for a request whose decode will never come is freed by `release`.
Colocated (no KV role), and short prompts under conditional disaggregation: a request runs whole.

Request channel: one method, `Generate`, answered with one `{"chunk": EngineChunk}` frame per engine step (the
last with a finish reason), or `{"end": true}` when the engine ended the request without one. The router closing
the connection (its client went away, a deadline passed) cancels the handler, which stops the request in the
engine within one step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from common.results import EngineChunk
from common.sampling import SamplingSpec
from kv_transfer.config import ConnectorSettings, TransferConfig
from kv_transfer.params import from_params
from worker.channel_server import Handler
from worker.engine import Engine, KVRole
from worker.host import EngineHost

KV_ROLE = "kv_consumer"


def consumer_role(instance_id: str, transfer: TransferConfig) -> KVRole:
    """The connector settings of a decode instance; the worker stamps its epoch when it starts."""
    return KVRole(KV_ROLE, ConnectorSettings(instance_id, 0, transfer))


class DecodeWorker(EngineHost):
    def handlers(self) -> dict[str, Handler]:
        return {"Generate": self.generate_call}

    async def _started(self, engine: Engine) -> None:
        if self._kv is not None:  # where prefill workers send this engine KV
            address = await engine.control("pdkv_address")
            engine.info = dataclasses.replace(engine.info, kv_address=str(address))

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingSpec,
        kv_params: dict[str, Any] | None = None,
    ) -> AsyncIterator[EngineChunk]:
        """The request's tokens, one chunk per engine step; with a `RecvSpec`, after its KV has landed."""
        engine = self._ready()
        spec = from_params(kv_params)
        async for chunk in engine.generate(request_id, prompt_token_ids, sampling, kv_params):
            if chunk.finish_reason is not None and spec is not None:
                chunk = dataclasses.replace(chunk, transfer=engine.transfer_record("recv", spec.transfer_id))
            yield chunk

    async def release(self, transfer_ids: list[str]) -> int:
        """Frees KV received for transfers whose decode request will never come; returns how many were held."""
        if self._kv is None:
            return 0
        return int(await self._ready().control("pdkv_release", list(transfer_ids)))
