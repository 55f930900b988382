"""What engines report, as plain data that crosses the request channel and Ray: an engine's shape
(`EngineInfo`), its load (`EngineStats`), one step's tokens (`EngineChunk`), a prefill's answer
(`PrefillResult`), and a KV link that could not be made (`KVLinkFailure`). The router reads them; the workers write
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.histogram import Histogram


@dataclass(frozen=True, slots=True)
class EngineInfo:
    max_model_len: int
    block_size: int
    num_blocks: int
    kv_block_bytes: int = 0  # one block's KV over all layers
    kv_address: str = ""  # where prefill workers send this engine KV (decode engines only)
    request_address: str = ""  # where the router sends this worker requests (`worker.channel_server`)
    prefix_caching: bool = False  # the engine keeps computed prompt blocks for later prompts that share them


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # share of KV blocks in use, 0.0 .. 1.0
    reports: int = 0  # scheduler reports seen; grows while the engine works
    preemptions: int = 0  # requests the scheduler preempted (KV ran out) since the engine started
    loop_lag: Histogram | None = None  # the worker actor's event-loop lag since it started
    step_time: Histogram | None = None  # its engine's step wall times since it started (`worker.steps`)

    @property
    def idle(self) -> bool:
        return self.running == 0 and self.waiting == 0 and self.kv_cache_usage == 0.0


@dataclass(frozen=True, slots=True)
class EngineChunk:
    """Tokens of one engine step. `prefill_compute` (seconds) rides on the first chunk only."""

    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length" or "abort" on the last chunk
    prefill_compute: float = 0.0  # first chunk: scheduled -> first token, in the engine
    engine_queue: float = 0.0  # first chunk: queued -> scheduled, in the engine
    transfer: dict[str, Any] | None = None  # last chunk of a request that loaded KV: its receive record


@dataclass(frozen=True, slots=True)
class PrefillResult:
    token_ids: list[int]  # the first output token (empty only if the engine aborted the request)
    finish_reason: str | None  # "stop" when the first token already ends the request
    engine_queue: float  # seconds queued in the engine
    compute: float  # seconds from scheduled to first token
    # Set when the prompt's KV will not reach the decode instance (its link could not be made): what happened,
    # naming both ends (`KVLinkFailure`). The decode instance must then prefill the prompt itself.
    kv_failure: str | None = None
    kv_failure_reason: str = ""  # its kind, a metric label: refused, unreachable, timeout, auth, no_route, error


@dataclass(frozen=True, slots=True)
class KVLinkFailure:
    """A prefill worker could not open a KV link to a decode worker. `reason` as `kv_failure_reason` above."""

    prefill_instance: str
    prefill_address: str  # the prefill worker's node address
    decode_instance: str
    decode_address: str  # the KV address the decode worker advertised
    reason: str
    error: str

    def __str__(self) -> str:
        return (f"{self.reason}: prefill {self.prefill_instance} (node {self.prefill_address}) could not open a KV "
                f"link to decode {self.decode_instance} at {self.decode_address}: {self.error}")
