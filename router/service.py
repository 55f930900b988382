"""The request lifecycle at the router (colocated mode).

    validate -> tokenize -> check lengths -> pick an instance -> stream from its worker -> detokenize

`Router.generate` yields `Delta`s; the last one carries the `Outcome`. It stops the request in the engine
when the consumer goes away (cancellation) or the deadline passes (`DeadlineExceeded`). Transport-agnostic:
the gRPC and HTTP frontends translate to and from it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray

from pdserve.router.errors import DeadlineExceeded, EngineFailure, ServeError
from pdserve.router.metrics import RouterMetrics
from pdserve.router.policy import Policy
from pdserve.router.registry import Registry
from pdserve.router.request import Request
from pdserve.router.timings import Clock, PhaseTimings
from pdserve.router.tokenizer import PromptTokenizer
from pdserve.router.validation import Limits, check_prompt_tokens, check_request

COLOCATED = "colocated"


@dataclass(frozen=True, slots=True)
class Outcome:
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    timings: PhaseTimings
    instance_id: str


@dataclass(frozen=True, slots=True)
class Delta:
    token_ids: list[int]
    text: str
    outcome: Outcome | None = None


def new_request_id() -> str:
    return uuid.uuid4().hex


class Router:
    def __init__(
        self, registry: Registry, policy: Policy, tokenizer: PromptTokenizer, limits: Limits, metrics: RouterMetrics
    ) -> None:
        self.metrics = metrics
        self.registry = registry
        self.policy = policy
        self.tokenizer = tokenizer
        self.limits = limits

    async def generate(self, request: Request) -> AsyncIterator[Delta]:
        """Streams the request's deltas; every request that ends is counted once in the metrics, by outcome."""
        ended = False
        try:
            async for delta in self._generate(request):
                if delta.outcome is not None:
                    o = delta.outcome
                    self.metrics.finished(o.finish_reason, o.prompt_tokens, o.completion_tokens, o.timings)
                    ended = True
                yield delta
        except ServeError as e:
            self.metrics.ended_early(e.status)
            ended = True
            raise
        finally:
            if not ended:
                self.metrics.ended_early("cancelled")

    async def _generate(self, request: Request) -> AsyncIterator[Delta]:
        clock = Clock(arrival=request.arrival or time.monotonic())
        check_request(request, self.limits)
        prompt_ids = self.tokenizer.encode(request)
        check_prompt_tokens(prompt_ids, self.limits)
        instance = self.registry.get(self.policy.pick(self.registry.snapshots(COLOCATED)))
        text = self.tokenizer.text_stream()
        produced = 0
        instance.outstanding += 1
        self.metrics.running.inc()
        clock.dispatched = time.monotonic()
        stream = instance.handle.generate.remote(request.request_id, prompt_ids, request.sampling)
        finished = False
        try:
            while not finished:
                chunk = await self._next(stream, request)
                clock.tokens_arrived(time.monotonic(), len(chunk.token_ids))
                if chunk.prefill_compute:
                    clock.prefill_compute = chunk.prefill_compute
                produced += len(chunk.token_ids)
                finished = chunk.finish_reason is not None
                outcome = None
                if finished:
                    if chunk.finish_reason not in ("stop", "length"):
                        raise EngineFailure(f"the engine ended the request with {chunk.finish_reason!r}")
                    outcome = Outcome(
                        chunk.finish_reason, len(prompt_ids), produced,
                        clock.colocated(time.monotonic()), instance.instance_id,
                    )
                yield Delta(chunk.token_ids, text.step(chunk.token_ids), outcome)
        finally:
            instance.outstanding -= 1
            self.metrics.running.dec()
            if not finished:
                # The client went away, the deadline passed or the worker failed: stop the engine's work.
                ray.cancel(stream)
                instance.handle.abort.remote(request.request_id)

    @staticmethod
    async def _next(stream: Any, request: Request) -> Any:
        try:
            # asyncio.timeout_at costs no task per token, unlike wait_for; None means no deadline.
            async with asyncio.timeout_at(request.deadline):
                # The generator hands out a reference once its object is ready, so awaiting it is immediate.
                return await (await anext(stream))
        except TimeoutError:
            raise DeadlineExceeded("the request's deadline passed before it finished") from None
        except StopAsyncIteration:
            raise EngineFailure("the worker ended the stream without a finish reason") from None
        except ray.exceptions.RayError as e:
            raise EngineFailure(f"the worker failed: {type(e).__name__}") from e
