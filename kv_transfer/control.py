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
        """Transfers in progress and bytes held in receive buffers."""
        state: dict[str, int] = _worker().state()
        return state

    def pdkv_release(self, transfer_ids: Sequence[str]) -> int:
        """Frees what arrived for these transfers and was not claimed; returns the bytes freed."""
        freed: int = _worker().release(list(transfer_ids))
        return freed
