"""What `Router.generate` streams: `Delta`s of tokens and their text, the last one carrying the request's
`Outcome`. Plain data; the frontends translate them to their wire formats."""

from __future__ import annotations

from dataclasses import dataclass

from router.timings import PhaseTimings


@dataclass(frozen=True, slots=True)
class Outcome:
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    timings: PhaseTimings
    prefill_instance: str  # the instance that computed the prompt
    decode_instance: str  # the instance that produced the later tokens (the same one when run whole)


@dataclass(frozen=True, slots=True)
class Delta:
    token_ids: list[int]
    text: str
    outcome: Outcome | None = None
