"""`PrefillWorker`: the Ray actor that hosts one vLLM engine in the KV producer role.

A prefill runs a request's prompt for one output token with a `SendSpec` in its KV params: the engine's connector
streams the prompt's KV, layer by layer, to the decode instance the spec names while the forward pass goes on.
The call returns the first token as soon as the engine has it (`PrefillResult`), and once the connector has
reported whether the link to the decode instance came up (in the same engine step, usually; at most
`transfer.connect_timeout_s` later). When it did not, the result says so (`kv_failure`, naming both ends, and a
WARNING line in the log): the router then has the decode instance prefill the prompt itself at once rather than wait
out the transfer's deadline. The engine keeps the KV blocks until the last byte has left (or failed to).

`probe_kv` dials every decode instance's KV listener once, at start-up, so that a deployment whose workers cannot
reach each other fails before it serves (`pdserve.links`).

Request channel: one method, `Prefill`, answered with one `{"result": PrefillResult}` frame. The router closing
the connection before the answer (its client went away, a deadline passed) cancels the handler, which stops the
request in the engine.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import ray

from common.channel import fields
from common.results import KVLinkFailure, PrefillResult
from common.sampling import SamplingSpec
from kv_transfer.config import ConnectorSettings, TransferConfig
from kv_transfer.params import SendSpec, from_params
from kv_transfer.transport import HANDSHAKE_TIMEOUT_S
from worker.channel_server import Call, Handler
from worker.engine import KVRole
from worker.host import EngineHost

KV_ROLE = "kv_producer"

log = logging.getLogger(__name__)


def producer_role(instance_id: str, transfer: TransferConfig) -> KVRole:
    """The connector settings of a prefill instance; the worker stamps its epoch when it starts."""
    return KVRole(KV_ROLE, ConnectorSettings(instance_id, 0, transfer))


def first_token_result(tokens: list[int], finish_reason: str | None, queue: float, compute: float) -> PrefillResult:
    """What a one-token run means to the router: with max_tokens=1 the engine says "length" unless the token itself
    stopped the request, so only "stop" ends the request here."""
    return PrefillResult(tokens, "stop" if finish_reason == "stop" else None, queue, compute)


class PrefillWorker(EngineHost):
    def handlers(self) -> dict[str, Handler]:
        # Whole requests too: when every decode instance is lost, the router finishes its requests here.
        return {"Prefill": self._prefill_call, "Generate": self.generate_call}

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
        result = first_token_result(tokens, reason, queue, compute)
        spec = from_params(kv_params)
        if tokens and isinstance(spec, SendSpec):
            failure = await self._link_failure(spec)
            if failure is not None:
                log.warning("KV transfer %s will not come (the decode instance prefills the prompt itself): %s",
                            spec.transfer_id, failure)
                result = replace(result, kv_failure=str(failure), kv_failure_reason=failure.reason)
        return result

    async def _link_failure(self, spec: SendSpec) -> KVLinkFailure | None:
        """Whether the link for this transfer failed to come up, as the connector reports at its first layer."""
        assert self._kv is not None, "a prefill worker runs a KV producer"
        timeout = self._kv.settings.transfer.connect_timeout_s + HANDSHAKE_TIMEOUT_S + 1.0
        try:
            record = await self._ready().wait_transfer_record("dial", spec.transfer_id, timeout)
        except TimeoutError:
            log.warning("no report on the KV link of transfer %s to %s within %.0f s", spec.transfer_id, spec.peer,
                        timeout)
            return None
        if record["ok"]:
            return None
        return self._failure(spec.peer_instance, spec.peer, str(record["reason"]), str(record["error"]))

    def _failure(self, decode_instance: str, decode_address: str, reason: str, error: str) -> KVLinkFailure:
        return KVLinkFailure(self.instance_id, ray.util.get_node_ip_address(), decode_instance, decode_address,
                             reason, error)

    async def probe_kv(self, peers: list[tuple[str, str]]) -> list[KVLinkFailure]:
        """Dials each decode instance's KV listener (instance id, KV address) once, with the authenticated
        handshake, then hangs up; one failure per peer this worker cannot reach."""
        records = await self._ready().control("pdkv_probe", [(str(i), str(a)) for i, a in peers])
        return [self._failure(r["instance_id"], r["address"], r["reason"], r["error"]) for r in records]
