"""`Placement`: what a policy may know of the request it places. Plain data, built once per request.

`prefix_hashes[i]` names the prompt's first `(i + 1) * block_tokens` tokens (a chain of block hashes, as
vLLM's prefix cache keys them), so the longest run of leading hashes an instance holds tells how much of the
prompt it need not compute again.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.predictor.prediction import LengthPrediction, from_max_tokens


@dataclass(frozen=True, slots=True)
class Placement:
    prompt_tokens: int
    max_tokens: int
    prediction: LengthPrediction | None = None  # None: assume the request runs to max_tokens
    prefix_hashes: tuple[int, ...] = ()
    block_tokens: int = 16

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0 or self.max_tokens < 0 or self.block_tokens < 1:
            raise ValueError(
                f"placement needs prompt_tokens, max_tokens >= 0 and block_tokens >= 1, got {self.prompt_tokens}, "
                f"{self.max_tokens}, {self.block_tokens}"
            )

    @property
    def length(self) -> LengthPrediction:
        if self.prediction is None:
            return from_max_tokens(self.max_tokens)
        return self.prediction.capped(self.max_tokens)


EMPTY = Placement(0, 0)  # what a length-aware policy assumes when a caller passes no placement
