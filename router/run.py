"""`Run`: one request in flight at the router, shared by the collaborators that serve it. Mutable, one owner
at a time (the request's own task).

A leg is one attempt at the rest of the request: the first from the prompt, a later one (after a lost worker)
from the prompt plus every token the client already has. Each leg has its own engine request id (`leg_id`),
which is also its KV transfer's id. The leg's `Placement` carries the block hashes of its context
(`router.placement.tracked.block_hashes`), computed once per leg.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from common.sampling import SamplingSpec
from router.delta import Outcome
from router.placement import Placement
from router.placement.tracked import block_hashes
from router.predictor.prediction import LengthPrediction, remaining
from router.registry import Held
from router.request import Request
from router.timings import Clock, PhaseTimings


@dataclass(slots=True)
class Run:
    request: Request
    prompt_ids: list[int]
    clock: Clock
    text: Any  # the detokenizer's stream
    produced: int = 0
    generated: list[int] = field(default_factory=list)  # every token the client has been sent
    finished: bool = False
    legs: int = 0
    prefill_instance: str = ""  # set once a prefill instance computed the prompt on this leg
    prediction: LengthPrediction | None = None  # of the whole output (the resumed tokens included); None: none
    held: Held | None = None  # the request on its current leg's decode (or colocated) instance
    block_tokens: int = 16  # the engines' KV block size, which the prefix hashes follow
    _hashes: tuple[int, tuple[int, ...]] = (-1, ())  # (leg, block hashes of its context)

    def __post_init__(self) -> None:
        # A request the client resumes starts as a run that lost its worker after sending those tokens: its first
        # leg continues from the prompt plus them. The detokenizer reads them too (their text went out before), so
        # a character split across the boundary comes out whole.
        if self.request.resume_token_ids:
            self.generated = list(self.request.resume_token_ids)
            self.produced = len(self.generated)
            self.text.step(self.generated)

    @property
    def context(self) -> list[int]:
        """What the next leg starts from."""
        return self.prompt_ids + self.generated

    @property
    def leg_id(self) -> str:
        """The engines' request id (and the transfer id) of the current leg: unique per leg."""
        rid = self.request.request_id
        return rid if self.legs <= 1 else f"{rid}.{self.legs}"

    def produce(self, token_ids: list[int]) -> None:
        self.produced += len(token_ids)
        self.generated += token_ids
        if self.held is not None:
            if self.held.first_token_at is None and token_ids:
                self.held.first_token_at = time.monotonic()
            self.held.generated += len(token_ids)

    def rest(self) -> SamplingSpec:
        """The sampling of what is left: the request's, less the tokens produced so far."""
        return replace(self.request.sampling, max_tokens=self.request.sampling.max_tokens - self.produced)

    def placement(self) -> Placement:
        """What a policy knows of the rest of the request: its context now, its blocks' hashes and the output still
        to come."""
        max_tokens = self.request.sampling.max_tokens
        prediction = None if self.prediction is None else remaining(self.prediction, self.produced, max_tokens)
        context = self.context
        if self._hashes[0] != self.legs:
            self._hashes = (self.legs, block_hashes(context, self.block_tokens))
        return Placement(len(context), max_tokens - self.produced, prediction, self._hashes[1], self.block_tokens)

    def outcome(self, finish_reason: str, timings: PhaseTimings, decode_instance: str) -> Outcome:
        """The request's outcome, its last tokens from `decode_instance`; the prompt's instance is this leg's
        prefill instance, or `decode_instance` when the leg ran whole there."""
        prefill = self.prefill_instance or decode_instance
        return Outcome(finish_reason, len(self.prompt_ids), self.produced, timings, prefill, decode_instance)
