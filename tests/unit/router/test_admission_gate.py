"""The admission gate, the retry hints on the wire, and draining in the placement filter: pure code."""

from __future__ import annotations

import pytest

from common.errors import (
    RETRY_AFTER_METADATA,
    InvalidArgument,
    NoInstance,
    Overloaded,
    retry_after_header,
    retry_after_ms,
    trailing_metadata,
)
from router.admission import Gate
from router.placement import POLICIES, InstanceSnapshot
from router.placement.load import LeastOutstanding, RoundRobin


def test_slots_then_queue_then_refusal_with_a_hint_that_grows():
    gate: Gate[str] = Gate(slots=2, queue=2, retry_after_s=0.5)
    assert gate.enter("a") and gate.enter("b")
    assert not gate.enter("c") and not gate.enter("d")
    assert (gate.running, gate.waiting) == (2, 2)
    with pytest.raises(Overloaded, match="2 requests already wait") as refused:
        gate.enter("e")
    assert refused.value.retry_after_s == pytest.approx(0.5 * (1 + 2 / 2))
    assert refused.value.status == "RESOURCE_EXHAUSTED"


def test_leave_hands_the_slot_to_the_oldest_waiter():
    gate: Gate[str] = Gate(slots=1, queue=3)
    assert gate.enter("a")
    assert not gate.enter("b") and not gate.enter("c")
    assert gate.leave() == "b"
    assert (gate.running, gate.waiting) == (1, 1)
    assert gate.leave() == "c"
    assert gate.leave() is None
    assert (gate.running, gate.waiting) == (0, 0)


def test_a_withdrawn_waiter_is_skipped_and_a_handed_one_must_leave():
    gate: Gate[str] = Gate(slots=1, queue=3)
    assert gate.enter("a")
    assert not gate.enter("b") and not gate.enter("c")
    assert gate.withdraw("b")  # its client went away while it waited
    assert gate.leave() == "c"
    assert not gate.withdraw("c")  # the slot reached it first: it runs, and leaves like any other
    assert gate.leave() is None
    assert (gate.running, gate.waiting) == (0, 0)


def test_newcomers_queue_behind_waiters_even_when_a_slot_is_free():
    gate: Gate[str] = Gate(slots=1, queue=1)
    assert gate.enter("a")
    assert not gate.enter("b")
    assert gate.leave() == "b"  # b holds the slot now; a newcomer cannot overtake
    with pytest.raises(Overloaded):
        gate.enter("c") or gate.enter("d")


def test_zero_slots_means_no_limit_and_zero_queue_refuses_at_once():
    unlimited: Gate[int] = Gate(slots=0, queue=0)
    assert all(unlimited.enter(i) for i in range(1000))
    strict: Gate[int] = Gate(slots=1, queue=0)
    assert strict.enter(1)
    with pytest.raises(Overloaded):
        strict.enter(2)


def test_leave_without_enter_is_a_bug():
    with pytest.raises(RuntimeError):
        Gate(1, 0).leave()


@pytest.mark.parametrize(
    "bad", [{"slots": -1, "queue": 0}, {"slots": 1, "queue": -1}, {"slots": 1, "queue": 0, "retry_after_s": 0.0}]
)
def test_bad_gate_settings_are_refused(bad):
    with pytest.raises(ValueError):
        Gate(**bad)


@pytest.mark.parametrize(
    ("seconds", "ms", "header"),
    [(0.0, "0", "0"), (0.0004, "1", "1"), (1.0, "1000", "1"), (1.2, "1200", "2"), (2.5, "2500", "3")],
)
def test_retry_hints_round_up(seconds, ms, header):
    e = Overloaded("busy", retry_after_s=seconds)
    assert retry_after_ms(e) == ms
    assert retry_after_header(e) == header
    assert trailing_metadata(e) == ((RETRY_AFTER_METADATA, ms),)


def test_only_overloaded_carries_a_hint():
    assert trailing_metadata(InvalidArgument("too large")) == ()


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_skips_a_draining_instance(name):
    snaps = [InstanceSnapshot("a", "decode", 0, draining=True), InstanceSnapshot("b", "decode", 5)]
    policy = POLICIES[name]()
    assert {policy.pick(snaps) for _ in range(4)} == {"b"}


def test_all_draining_is_no_instance_and_says_so():
    snaps = [InstanceSnapshot("a", "decode", 0, draining=True)]
    for policy in (RoundRobin(), LeastOutstanding()):
        with pytest.raises(NoInstance, match="not draining"):
            policy.pick(snaps)
