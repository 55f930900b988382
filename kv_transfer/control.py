"""Reaching our connector's worker role from the actor that owns the engine (vLLM's worker extension).

vLLM mixes `KVControl` into its worker class (`worker_extension_cls`); `AsyncLLM.collective_rpc("pdkv_...")`
then runs these methods in the model-runner process, where the connector's `KVWorker` lives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _worker() -> Any:
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group().worker  # type: ignore[attr-defined]  # our connector's (`PdConnector`)


class KVControl:
    def pdkv_address(self) -> str:
        """Where prefill workers dial this decode worker ("" on a prefill-only engine)."""
        receiver = _worker().receiver
        return receiver.address if receiver is not None else ""

    def pdkv_state(self) -> dict[str, int]:
        """Transfers in progress, bytes held in receive buffers, and the process's switch interval (µs)."""
        state: dict[str, int] = _worker().state()
        return state

    def pdkv_probe(self, peers: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
        """Dials each decode worker (instance id, KV address) once, proves the secret and hangs up (a prefill
        engine only); one record per peer not reached: {"instance_id", "address", "reason", "error"}. Blocks this
        process for up to `transfer.connect_timeout_s` (the peers are dialed at once): call it at start-up."""
        failures: list[dict[str, str]] = _worker().probe([(str(i), str(a)) for i, a in peers])
        return failures

    def pdkv_release(self, transfer_ids: Sequence[str]) -> int:
        """Frees what arrived for these transfers and was not claimed; returns the bytes freed."""
        freed: int = _worker().release(list(transfer_ids))
        return freed
