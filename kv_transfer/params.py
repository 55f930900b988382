"""What the router tells an engine about one request's KV transfer, as `kv_transfer_params`.

The router mints one transfer per disaggregated request and hands the same `transfer_id` to both engines:

    prefill engine:  SendSpec  (max_tokens=1)  -> sends the KV of the prompt's `num_tokens` tokens to `peer`
    decode engine:   RecvSpec  prompt + [first token]  -> loads those `num_tokens` tokens, computes the rest

The decode prompt carries the first token the prefill sampled, so the decode engine computes that token's KV
itself and samples the second token from exactly the state a single engine would have: nothing is recomputed
and nothing is sampled twice.

Messages on a link are keyed per layer (`layer_key`); each carries the whole KV blocks that hold the prompt's
tokens in that layer (a partial last block travels whole; the decode overwrites its tail when it writes the
next token). Pure data: parsed at the edge of the engine from plain dicts, so a malformed dict is a clear
`ValueError`, never a half-read spec.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PARAMS_KEY = "pdserve"  # the key under kv_transfer_params that holds our spec


@dataclass(frozen=True, slots=True)
class SendSpec:
    """Prefill side: stream the prompt's KV to the decode instance `peer_instance` listening at `peer`."""

    transfer_id: str
    peer: str  # a transport address: "shm:<name>" or "tcp:<host>:<port>"
    peer_instance: str
    num_tokens: int
    deadline: float  # wall-clock seconds (time.time()); sends past it are abandoned
    layerwise: bool = True  # send each layer as soon as it is computed (else all after the forward)

    def __post_init__(self) -> None:
        _check_common(self.transfer_id, self.num_tokens, self.deadline)
        if not self.peer or not self.peer_instance:
            raise ValueError("a send spec needs the peer's address and instance id")


@dataclass(frozen=True, slots=True)
class RecvSpec:
    """Decode side: load the KV of the first `num_tokens` tokens, sent by the prefill instance `peer_instance`."""

    transfer_id: str
    peer_instance: str
    num_tokens: int
    deadline: float  # wall-clock seconds; a load not complete by then fails and the engine recomputes

    def __post_init__(self) -> None:
        _check_common(self.transfer_id, self.num_tokens, self.deadline)
        if not self.peer_instance:
            raise ValueError("a receive spec needs the sending instance's id")


Spec = SendSpec | RecvSpec


def _check_common(transfer_id: str, num_tokens: int, deadline: float) -> None:
    if not transfer_id or len(transfer_id) > 200:
        raise ValueError("transfer_id must be a non-empty string of at most 200 characters")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if not math.isfinite(deadline):
        raise ValueError(f"deadline must be a finite wall-clock time, got {deadline}")


def to_params(spec: Spec) -> dict[str, Any]:
    """The `kv_transfer_params` dict for an engine request."""
    body: dict[str, Any] = {
        "role": "send" if isinstance(spec, SendSpec) else "recv",
        "transfer_id": spec.transfer_id,
        "peer_instance": spec.peer_instance,
        "num_tokens": spec.num_tokens,
        "deadline": spec.deadline,
    }
    if isinstance(spec, SendSpec):
        body["peer"] = spec.peer
        body["layerwise"] = spec.layerwise
    return {PARAMS_KEY: body}


def from_params(params: dict[str, Any] | None) -> Spec | None:
    """The spec inside `kv_transfer_params`; None when the request has none of ours."""
    if not params or PARAMS_KEY not in params:
        return None
    body = params[PARAMS_KEY]
    if not isinstance(body, dict):
        raise ValueError(f"kv_transfer_params[{PARAMS_KEY!r}] must be a mapping")
    try:
        transfer_id, peer_instance = str(body["transfer_id"]), str(body["peer_instance"])
        num_tokens, deadline = int(body["num_tokens"]), float(body["deadline"])
        role = body["role"]
        if role == "send":
            layerwise = bool(body.get("layerwise", True))
            return SendSpec(transfer_id, str(body["peer"]), peer_instance, num_tokens, deadline, layerwise)
        if role == "recv":
            return RecvSpec(transfer_id, peer_instance, num_tokens, deadline)
    except KeyError as e:
        raise ValueError(f"kv_transfer_params[{PARAMS_KEY!r}] lacks {e.args[0]!r}") from None
    raise ValueError(f"kv_transfer_params[{PARAMS_KEY!r}]['role'] must be 'send' or 'recv', got {role!r}")


def layer_key(transfer_id: str, layer: int) -> bytes:
    return f"{transfer_id}/{layer}".encode()


def blocks_for(num_tokens: int, block_size: int) -> int:
    """KV blocks that hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


def block_runs(block_ids: Sequence[int]) -> list[tuple[int, int]]:
    """`block_ids` in order as half-open runs [start, stop) of consecutive ids: one contiguous span of a layer's KV
    each, so a message is a few large views rather than one view per block."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    return runs
