"""`Legs`: a request's legs on the workers, and its resumption when a worker is lost.

A leg places the rest of the request on a decode (colocated mode: a colocated) instance through the hold queue,
then runs it there whole, or hands it off (`Disaggregated`: prefill elsewhere, then decode there) when the
router disaggregates, the context is long enough and some prefill instance is there. With every decode instance
lost, the leg runs whole on a prefill instance, so the layout of one decode instance survives its death. The
instance holds the request from placement until the leg ends, however it ends.

The first leg of a request that the router sheds (`router.placement.slo`: its first token projected later than
the TTFT objective) is refused with `Overloaded` once placed, before any engine sees it, and its placement
released.

A leg whose worker is lost (`WorkerLost`) takes that instance out of the pool, and the request resumes on
another instance from the prompt plus every token the client already has (greedy output is unchanged by the
move): at most `MAX_RESUMES` times, after which it fails with `EngineFailure`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from common.errors import EngineFailure, Overloaded
from common.roles import Role
from router.delta import Delta
from router.handoff import Disaggregated
from router.hold import HoldQueue
from router.metrics import RouterMetrics
from router.placement.slo import Objectives, projected_ttft, shed_after
from router.run import Run
from router.stream import Streams, WorkerLost

log = logging.getLogger(__name__)

MAX_RESUMES = 2  # lost workers a request survives


class Legs:
    def __init__(self, hold: HoldQueue, streams: Streams, disaggregated: Disaggregated | None,
                 metrics: RouterMetrics, objectives: Objectives) -> None:
        self.hold = hold
        self.streams = streams
        self.disaggregated = disaggregated  # None: colocated mode
        self.metrics = metrics
        self.objectives = objectives

    async def run(self, run: Run) -> AsyncIterator[Delta]:
        """The run's deltas, over as many legs as lost workers make it take."""
        while True:
            try:
                async for delta in self._leg(run):
                    yield delta
                return
            except WorkerLost as lost:
                lost.instance.healthy = False
                if run.legs > MAX_RESUMES:
                    raise EngineFailure(f"{run.legs} workers failed under the request: {lost}") from None
                self.metrics.resumed.inc()
                log.warning("request %s resumes after %s", run.request.request_id, lost)

    def _role(self) -> Role:
        """The pool the next leg is placed in: decode (colocated mode: colocated); when every decode instance is
        lost, a prefill instance, which runs the rest whole until a decode instance is back."""
        if self.disaggregated is None:
            return Role.COLOCATED
        registry = self.hold.registry
        if not registry.placeable(Role.DECODE) and registry.placeable(Role.PREFILL):
            return Role.PREFILL
        return Role.DECODE

    async def _leg(self, run: Run) -> AsyncIterator[Delta]:
        """The run's next leg: all of it, or what is left of it after a lost worker."""
        run.legs += 1
        run.prefill_instance = ""
        role = self._role()
        d = self.disaggregated if role == Role.DECODE else None  # None: this leg cannot hand off
        handoff = d is not None and d.applies(run)
        # Colocated mode, short prompts, every prefill instance lost, or every decode instance lost: the request
        # runs whole on one instance; so does a leg its decode instance serves sooner (`router.split_policy`).
        instance = await self.hold.place(role, run)
        try:
            if d is not None:
                handoff = handoff and not d.runs_whole(run, instance, self.objectives.tpot_s)
            if run.legs == 1 and self.objectives.shed:
                placement = run.placement()
                self._shed(run, *(d.least_work(placement) if handoff and d is not None
                                  else instance.prefill_work(placement)))
            if d is not None:
                self.metrics.legs.labels("split" if handoff else "whole").inc()
            if handoff:
                assert d is not None
                deltas = d.leg(run, instance)
            else:
                run.clock.dispatched = run.clock.dispatched or time.monotonic()
                deltas = self.streams.stream(run, instance)
            async for delta in deltas:
                yield delta
        finally:
            self.hold.release(instance, run)

    def _shed(self, run: Run, queued: int, tokens: int) -> None:
        """Refuses the run when its first token, behind `queued` prompt tokens and its own `tokens` (those the
        instance's prefix cache does not hold), is projected later than the TTFT objective."""
        assert self.objectives.ttft_s is not None
        waited = time.monotonic() - run.clock.arrival
        pace = self.streams.pace.seconds_per_token
        hint = shed_after(waited, queued, tokens, pace, self.objectives.ttft_s, self.objectives.retry_floor_s)
        if hint is None:
            return
        assert pace is not None
        self.metrics.shed.inc()
        raise Overloaded(
            f"the first token could not come within the {self.objectives.ttft_s:g} s objective now: it is projected at "
            f"{projected_ttft(waited, queued, tokens, pace):.2f} s ({queued} prompt tokens queued ahead of the "
            f"{tokens} it computes); retry in {hint:.2f} s",
            retry_after_s=hint,
        )
