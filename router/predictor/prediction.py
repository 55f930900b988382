"""The `LengthPrediction` noun: quantiles of a request's output length, never a bare int.

Contract: `0 <= p50 <= p90`, both in tokens of output (the first token included). Predictors map a request's
plain features to a prediction; the learned predictor lives elsewhere, this module holds the noun, the
predictor protocol, the trivial baselines and the pure arithmetic policies need (what is left to generate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class LengthPrediction:
    p50: int
    p90: int

    def __post_init__(self) -> None:
        if not 0 <= self.p50 <= self.p90:
            raise ValueError(f"a length prediction needs 0 <= p50 <= p90, got p50={self.p50} p90={self.p90}")

    def capped(self, max_tokens: int) -> LengthPrediction:
        """No request generates more than its `max_tokens`; a prediction never says otherwise."""
        return LengthPrediction(min(self.p50, max_tokens), min(self.p90, max_tokens))


class LengthPredictor(Protocol):
    def predict(self, prompt_tokens: int, max_tokens: int) -> LengthPrediction: ...


class TextPredictor(Protocol):
    """What the router asks: quantiles from the prompt's text and length, and each finished request's length."""

    def predict_text(self, prompt: str, prompt_tokens: int, max_tokens: int) -> LengthPrediction: ...

    def observe(self, prediction: LengthPrediction, generated: int) -> None: ...


def from_max_tokens(max_tokens: int) -> LengthPrediction:
    """The pessimistic baseline: every request runs to its `max_tokens`."""
    return LengthPrediction(max_tokens, max_tokens)


@dataclass(frozen=True, slots=True)
class FixedPrediction:
    """The same quantiles for every request (capped by its `max_tokens`): the no-information baseline."""

    p50: int = 128
    p90: int = 512

    def predict(self, prompt_tokens: int, max_tokens: int) -> LengthPrediction:
        return LengthPrediction(self.p50, self.p90).capped(max_tokens)

    def predict_text(self, prompt: str, prompt_tokens: int, max_tokens: int) -> LengthPrediction:
        return self.predict(prompt_tokens, max_tokens)

    def observe(self, prediction: LengthPrediction, generated: int) -> None:
        """Learns nothing."""


def remaining(prediction: LengthPrediction, generated: int, max_tokens: int) -> LengthPrediction:
    """What is left to generate after `generated` tokens.

    A request that outlives a quantile is not about to stop: its remaining quantile is then taken as at
    least one more token (and never beyond `max_tokens`), so a long tail keeps counting as load.
    """
    left = max(max_tokens - generated, 0)
    p50 = min(max(prediction.p50 - generated, 1), left)
    p90 = min(max(prediction.p90 - generated, p50), left)
    return LengthPrediction(p50, p90)
