"""Plain result types of the client; independent of the generated protobuf classes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PhaseTimings:
    """Seconds spent in each phase of a request (0 where a phase did not happen)."""

    router_queue: float = 0.0
    prefill_queue: float = 0.0
    prefill_compute: float = 0.0
    kv_transfer: float = 0.0
    decode_queue: float = 0.0
    first_decode_step: float = 0.0
    decode: float = 0.0
    time_to_first_token: float = 0.0
    end_to_end: float = 0.0
    kv_transfer_failure: str = ""  # why the KV did not reach the decode instance (it prefilled itself); "": it did


@dataclass(frozen=True)
class Final:
    """What the last message of a stream says about the whole request."""

    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    timings: PhaseTimings
    prefill_instance: str
    decode_instance: str

    @property
    def time_per_output_token(self) -> float:
        """TPOT as vLLM's benchmark defines it: (end-to-end - TTFT) / (completion tokens - 1); 0 for one token."""
        if self.completion_tokens < 2:
            return 0.0
        t = self.timings
        return (t.end_to_end - t.time_to_first_token) / (self.completion_tokens - 1)


@dataclass(frozen=True)
class Chunk:
    """Tokens generated since the previous chunk, with their text; `final` is set on the last chunk only."""

    request_id: str
    token_ids: list[int]
    text: str
    final: Final | None = None


@dataclass(frozen=True)
class Completion:
    """A whole generation, collected from its stream."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    final: Final | None = None


@dataclass(frozen=True)
class ServerInfo:
    version: str
    mode: str
    default_model: str
    max_model_len: int
    max_tokens_limit: int
    prefill_instances: int
    decode_instances: int
