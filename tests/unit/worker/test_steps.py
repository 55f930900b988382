"""`StepClock` turns the engine's end-of-step reports into step wall times: from the previous end while the engine
held requests, from the step's scheduling stamp after it may have idled, and only for steps that ran the model."""

from __future__ import annotations

import pytest

from worker.steps import StepClock, StepReport


def clock() -> tuple[StepClock, list[float]]:
    seen: list[float] = []
    return StepClock(seen.append), seen


def test_steps_of_a_busy_engine_run_from_one_end_to_the_next() -> None:
    c, seen = clock()
    c.report(StepReport(end=10.0, held=2, running=2, emitted=True, scheduled=9.6))  # after an idle start
    c.report(StepReport(end=10.05, held=2, running=2, emitted=True))
    c.report(StepReport(end=10.12, held=0, running=0, emitted=True))  # its last requests finished in it
    assert seen == pytest.approx([0.4, 0.05, 0.07])


def test_after_an_idle_engine_a_step_starts_when_its_scheduling_began() -> None:
    c, seen = clock()
    c.report(StepReport(end=5.0, held=0, running=0, emitted=True, scheduled=4.0))
    # 20 s idle, then a one-token prefill: scheduled at 25.0, done (and finished) at 25.3
    c.report(StepReport(end=25.3, held=0, running=0, emitted=True, scheduled=25.0))
    assert seen == pytest.approx([1.0, 0.3])


def test_a_step_with_no_known_start_is_not_counted() -> None:
    c, seen = clock()
    # The first chunk of a long prompt after idling: no output yet, so no scheduling stamp; the next chunk is timed
    # from its end, and the stamp that rides on the last chunk's output (earlier than that end) is not used.
    c.report(StepReport(end=1.0, held=0, running=0, emitted=False))
    c.report(StepReport(end=3.0, held=1, running=1, emitted=False))
    c.report(StepReport(end=5.0, held=1, running=1, emitted=False))
    c.report(StepReport(end=5.5, held=1, running=1, emitted=True, scheduled=2.0))
    assert seen == pytest.approx([2.0, 0.5])


def test_loops_that_ran_nothing_while_kv_was_in_transit_only_mark_the_previous_end() -> None:
    c, seen = clock()
    c.report(StepReport(end=1.0, held=1, running=1, emitted=True, scheduled=0.9))
    for end in (1.001, 1.002, 1.003):  # the one request waits for its KV: nothing runs
        c.report(StepReport(end=end, held=1, running=0, emitted=False))
    c.report(StepReport(end=1.023, held=1, running=1, emitted=True, scheduled=0.9))  # its KV landed: it decodes
    assert seen == pytest.approx([0.1, 0.02])
