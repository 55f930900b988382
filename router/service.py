"""`Router`: the request lifecycle at the router, as a short loop over named collaborators.

    validate -> tokenize -> admit -> predict -> run legs (resume on a lost worker) -> learn

- admission (`router.admission.admitted`): at most `max_outstanding` requests run at once, a bounded queue of
  others waits for a slot in arrival order, and one more is refused with `Overloaded` and a retry hint;
- prediction (`router.learner.Learner`): the output length's quantiles, once per request, for placement; each
  finished request's length is scored against its prediction and fed back to the predictor's calibration;
- legs (`router.legs.Legs`): a request projected to miss its TTFT objective is refused once placed (`router.shed`);
  each leg is placed through the KV-room hold queue (`router.hold.HoldQueue`) and runs
  whole on one instance (colocated mode, short prompts) or hands off from a prefill instance to the decode one
  (`router.handoff`, when a `Handoff` is given); a leg that loses its worker resumes on another instance;
- streaming (`router.stream`): engine chunks become `Delta`s; the last one carries the `Outcome`;
- metrics (`router.tally.Tally`): every request that ends is counted once, by outcome.

`Router.generate` stops the request in the engines when the consumer goes away (cancellation) or the deadline
passes (`DeadlineExceeded`), and frees KV that was sent for a decode that will not come. `Router.drain` takes an
instance out of placement (it keeps what it runs) and returns once it runs nothing. Transport-agnostic: the gRPC
and HTTP frontends translate to and from it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from common.errors import ServeError
from common.roles import Role
from router.admission import Gate, admitted
from router.cleanups import Cleanups
from router.delta import Delta, Outcome
from router.handoff import Disaggregated, Handoff
from router.hold import HoldQueue
from router.learner import Learner
from router.legs import Legs
from router.metrics import RouterMetrics
from router.placement import Policy
from router.placement.slo import Objectives
from router.predictor.prediction import TextPredictor
from router.registry import Registry
from router.request import Request
from router.run import Run
from router.stream import Streams
from router.tally import Tally
from router.timings import Clock
from router.tokenizer import PromptTokenizer
from router.validation import Limits, check_prompt_tokens, check_request, check_resume

__all__ = ["Delta", "Handoff", "Outcome", "Router", "RouterParts", "new_request_id"]


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class RouterParts:
    """What a `Router` is made of: the instances, their placement, tokenizing and limits, metrics; with `handoff`
    it disaggregates, `admission` bounds what runs at once, `predictor` predicts output lengths, `hold_queue` bounds
    the requests waiting for KV room, `objectives` sets the objectives (and shedding) per request."""

    registry: Registry
    policy: Policy
    tokenizer: PromptTokenizer
    limits: Limits
    metrics: RouterMetrics
    handoff: Handoff | None = None
    admission: Gate[asyncio.Future[None]] | None = None
    predictor: TextPredictor | None = None
    hold_queue: int = 0
    objectives: Objectives = field(default_factory=Objectives)


class Router:
    def __init__(self, parts: RouterParts) -> None:
        self.registry = parts.registry
        self.tokenizer = parts.tokenizer
        self.limits = parts.limits
        self.metrics = metrics = parts.metrics
        self.handoff = parts.handoff
        self.admission: Gate[asyncio.Future[None]] = parts.admission or Gate(0, 0)
        self.hold = HoldQueue(parts.registry, parts.policy, parts.hold_queue, metrics)
        self.learner = Learner(parts.predictor, parts.tokenizer, metrics)
        self._cleanups = Cleanups()
        streams = Streams(metrics, self._cleanups)
        disaggregated = None
        if parts.handoff is not None:
            disaggregated = Disaggregated(parts.handoff, parts.registry, streams, self._cleanups)
        self.legs = Legs(self.hold, streams, disaggregated, metrics, parts.objectives)

    @property
    def policy(self) -> Policy:
        """Places decodes (disaggregated) or whole requests (colocated); replaceable between requests."""
        return self.hold.policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self.hold.policy = policy

    @property
    def predictor(self) -> TextPredictor | None:
        """Predicts output lengths for placement; None: none. Replaceable between requests."""
        return self.learner.predictor

    @predictor.setter
    def predictor(self, predictor: TextPredictor | None) -> None:
        self.learner.predictor = predictor

    @property
    def mode(self) -> str:
        return "disaggregated" if self.handoff is not None else Role.COLOCATED

    async def generate(self, request: Request) -> AsyncIterator[Delta]:
        """Streams the request's deltas, the last one carrying its `Outcome`; raises its `ServeError`. Every
        request that ends is counted once in the metrics, by outcome."""
        tally = Tally(self.metrics)
        try:
            clock = Clock(arrival=request.arrival or time.monotonic())
            check_request(request, self.limits)
            prompt_ids = await self.tokenizer.encode_async(request)  # off the loop, after its byte limit
            check_prompt_tokens(prompt_ids, self.limits)
            check_resume(prompt_ids, request, self.limits)
            async with admitted(self.admission, request.deadline):
                run = Run(request, prompt_ids, clock, self.tokenizer.text_stream(),
                          block_tokens=self.registry.block_size)
                run.prediction = await self.learner.predict(request, prompt_ids)
                async for delta in self.legs.run(run):
                    if delta.outcome is not None:
                        self.learner.learn(run.prediction, delta.outcome.completion_tokens)
                    tally.sent(delta)
                    yield delta
        except ServeError as e:
            tally.failed(e)
            raise
        finally:
            tally.close()

    async def settle(self) -> None:
        """Waits until every abort and release sent to the workers so far has run (errors ignored)."""
        await self._cleanups.settle()

    async def drain(self, instance_id: str, timeout: float) -> None:
        """Places no new request on the instance; returns once the requests it runs have ended (TimeoutError
        after `timeout` seconds, the instance still draining). Placement skips it until `undrain`."""
        instance = self.registry.get(instance_id)
        instance.draining = True
        async with asyncio.timeout(timeout):
            while instance.outstanding > 0:
                await asyncio.sleep(0.05)  # requests end on other tasks; their count is all there is to watch

    def undrain(self, instance_id: str) -> None:
        self.registry.get(instance_id).draining = False
