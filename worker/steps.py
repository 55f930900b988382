"""`StepClock`: the wall time of each engine step, read from the reports vLLM's engine core sends its frontend.

What a step is. The engine core loops: take in new requests, `schedule`, run the model (forward and sampling),
`update_from_output`. At the end of every step it sends one `EngineCoreOutputs`, stamped with `time.monotonic()`
in the engine core's process (CLOCK_MONOTONIC, one clock for every process on the host), with the scheduler's
report attached; `StepReport` is what we keep of it. A step's time is its end stamp minus its start, where the start
is:
- the previous step's end stamp, when that step's report showed requests in the scheduler: the engine then goes
  straight on (it waits for work only when it holds none). The step covers taking in new requests, scheduling,
  the model and the output bookkeeping: what every running request waited between two of its tokens;
- otherwise (the engine may have idled) the moment its scheduling began, which the engine stamps on each request
  it schedules for the first time (its SCHEDULED event, sent with the request's next output). A step whose
  requests carry no such stamp (the first chunk of a prompt prefilled over several steps) has no known start and
  is not counted.

Only steps that ran the model count: requests run after it, or it emitted tokens. While every request waits for
KV still in transit the engine loops with nothing to run (pausing 1 ms each time); those reports only mark the
previous end, so the step right after such a wait includes up to that 1 ms pause.

The stamps are the engine's, not the times reports reach this process, so the worker actor's own event-loop lag
(`pdserve_worker_event_loop_lag_seconds`) does not show in step times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# CPU engine steps: a few ms (a decode step of a small model) to seconds (a long prompt's prefill).
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds


@dataclass(frozen=True, slots=True)
class StepReport:
    end: float  # the engine's monotonic stamp at the end of the step
    held: int  # requests in the scheduler after the step: running, waiting, or waiting on KV
    running: int  # of those, the running ones
    emitted: bool  # the step produced tokens for some request
    scheduled: float | None = None  # earliest SCHEDULED stamp among the requests it sent outputs for


class StepClock:
    def __init__(self, observe: Callable[[float], None]) -> None:
        self._observe = observe
        self._last_end: float | None = None
        self._busy = False  # the last report showed requests held: the engine did not wait for work since

    def report(self, step: StepReport) -> None:
        start = None
        if self._busy:
            start = self._last_end
        elif step.scheduled is not None and (self._last_end is None or step.scheduled >= self._last_end):
            start = step.scheduled
        if start is not None and (step.running > 0 or step.emitted) and step.end >= start:
            self._observe(step.end - start)
        self._last_end, self._busy = step.end, step.held > 0


def step_report(outputs: Any) -> StepReport | None:
    """What a step's `EngineCoreOutputs` says of it; None for outputs that end no step (replies to a utility call)."""
    from vllm.v1.engine import EngineCoreEventType

    stats = outputs.scheduler_stats
    if stats is None:
        return None
    emitted, scheduled = False, None
    for out in outputs.outputs:
        emitted = emitted or bool(out.new_token_ids)
        for event in out.events or ():
            if event.type == EngineCoreEventType.SCHEDULED and (scheduled is None or event.timestamp < scheduled):
                scheduled = event.timestamp
    held = stats.num_running_reqs + stats.num_waiting_reqs + stats.num_skipped_waiting_reqs
    return StepReport(outputs.timestamp, held, stats.num_running_reqs, emitted, scheduled)
