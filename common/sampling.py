"""`SamplingSpec`: how a request's tokens are sampled, as the router hands it to a worker. Immutable.

The router builds it from the client's request; the workers turn it into the engine's sampling parameters.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    """Sampling as the client asked for it; None means "the default"."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
