"""`Streams`: one leg's tokens from an engine, as `Delta`s, through the instance's request channel.

`stream(run, instance, receive)` runs the rest of the run on the instance: from `run.context`, sampling what is
left of `max_tokens`, with the KV of the prompt coming from a prefill instance when `receive` is given (the
decode half of a handoff: `receive.landed` is awaited once the first chunk shows the engine has the KV). The last
delta carries the `Outcome`. While it streams the instance counts the request as outstanding; a leg that runs
whole there (no `receive`) is a prompt the instance computes (`computes`: its tracked prefixes and the prefix
metrics), and its uncached tokens count in the instance's prefill queue until the first chunk. A stream left
before the engine finished (consumer gone, deadline passed, worker failed) is cancelled, and the engine's
request aborted, exactly once.

`awaited(step, deadline, instance)` is how every engine call is awaited: a passed deadline becomes
`DeadlineExceeded`, a worker gone `WorkerLost` (the router then resumes the request elsewhere).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from common.errors import DeadlineExceeded, EngineFailure
from router.channel import WorkerGone
from router.cleanups import Cleanups
from router.delta import Delta, Outcome
from router.metrics import RouterMetrics
from router.placement import Placement
from router.placement.split import PrefillPace
from router.registry import Instance
from router.run import Run

T = TypeVar("T")


class WorkerLost(Exception):
    """The worker running a leg of a request is gone; the router resumes the request elsewhere."""

    def __init__(self, instance: Instance, reason: str) -> None:
        super().__init__(f"{instance.instance_id}: {reason}")
        self.instance = instance


@dataclass(frozen=True, slots=True)
class Receive:
    """The decode half of a handoff: the KV connector's parameters for the decode engine, and what to do once the
    KV has landed there."""

    kv_params: dict[str, Any] | None  # None: the KV will not come (`failure` says why); the engine prefills
    landed: Callable[[], Awaitable[None]]
    failure: str = ""


async def awaited(step: Awaitable[T], deadline: float | None, instance: Instance) -> T:
    """`step`'s result; a passed deadline becomes `DeadlineExceeded`, a worker gone `WorkerLost`."""
    try:
        # asyncio.timeout_at costs no task per token, unlike wait_for; None means no deadline.
        async with asyncio.timeout_at(deadline):
            return await step
    except TimeoutError:
        raise DeadlineExceeded("the request's deadline passed before it finished") from None
    except WorkerGone as e:
        raise WorkerLost(instance, str(e)) from None


class Streams:
    def __init__(self, metrics: RouterMetrics, cleanups: Cleanups) -> None:
        self.metrics = metrics
        self.cleanups = cleanups
        self.pace = PrefillPace()  # of the prefills this router saw finish, whole legs' and prefill instances'

    def computes(self, instance: Instance, placement: Placement) -> int:
        """`instance` computes the placement's prompt: recorded in its tracked prefixes and the prefix metrics.
        Returns the prompt tokens it computes, those its prefix cache holds left out."""
        hit = instance.computes(placement)
        if hit is None:
            return placement.prompt_tokens
        self.metrics.prefix_routed(hit)
        return placement.prompt_tokens - hit.saved_tokens

    async def stream(self, run: Run, instance: Instance, receive: Receive | None = None) -> AsyncIterator[Delta]:
        """The rest of the run on `instance` (see the module docstring)."""
        kv_params = None if receive is None else receive.kv_params
        queued = self.computes(instance, run.placement()) if receive is None else 0
        instance.queued_prefill_tokens += queued
        instance.outstanding += 1
        self.metrics.running.inc()
        stream = instance.channel.generate(run.leg_id, run.context, run.rest(), kv_params)
        first = True
        try:
            while not run.finished:
                chunk = await awaited(stream.next(), run.request.deadline, instance)
                run.clock.tokens_arrived(time.monotonic(), len(chunk.token_ids))
                if first:
                    first = False
                    instance.queued_prefill_tokens -= queued
                    self.pace.observe(queued, chunk.prefill_compute)
                    queued = 0
                    await self._first_chunk(run, chunk, receive)
                run.produce(chunk.token_ids)
                outcome = None if chunk.finish_reason is None else self._finish(run, instance, chunk, receive)
                yield Delta(chunk.token_ids, run.text.step(chunk.token_ids), outcome)
        finally:
            instance.queued_prefill_tokens -= queued
            instance.outstanding -= 1
            self.metrics.running.dec()
            if not run.finished:
                # The client went away, the deadline passed or the worker failed: stop the engine's work.
                stream.cancel()
                self.cleanups.send(instance.handle.abort.remote(run.leg_id))

    @staticmethod
    async def _first_chunk(run: Run, chunk: Any, receive: Receive | None) -> None:
        clock = run.clock
        if receive is not None:
            clock.decode_compute = clock.decode_compute or chunk.prefill_compute
            await receive.landed()
        elif run.legs == 1:
            clock.prefill_compute = chunk.prefill_compute

    def _finish(self, run: Run, instance: Instance, chunk: Any, receive: Receive | None) -> Outcome:
        """The run ended with `chunk`: its outcome, or EngineFailure for an end other than stop or length."""
        if chunk.finish_reason not in ("stop", "length"):
            raise EngineFailure(f"the engine ended the request with {chunk.finish_reason!r}")
        run.finished = True
        now = time.monotonic()
        if receive is None:
            return run.outcome(chunk.finish_reason, run.clock.colocated(now), instance.instance_id)
        run.clock.kv_wait = _kv_wait(chunk.transfer)
        if chunk.transfer:
            self.metrics.transferred(int(chunk.transfer["bytes"]), bool(chunk.transfer["ok"]))
        timings = dataclasses.replace(run.clock.disaggregated(now), kv_transfer_failure=receive.failure)
        return run.outcome(chunk.finish_reason, timings, instance.instance_id)


def _kv_wait(record: dict[str, Any] | None) -> float:
    """Seconds the decode engine waited for KV that had not landed when it was ready for it."""
    if not record:
        return 0.0
    return max(0.0, float(record["landed"]) - float(record["posted"]))
