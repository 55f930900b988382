"""Placement policies: filter -> score -> pick over instance snapshots. Pure code.

A policy receives the snapshots of every instance of one role, and optionally the `Placement` of the request
(length-aware policies need it; the others ignore it), and returns the id of the chosen one, or raises
`NoInstance` when none is eligible (`Overloaded` when none can take the request's projected load). Policies
keep no reference to live objects, so the same objects run in the router and in tests (and in the simulator)
unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from common.errors import NoInstance
from router.instance import InstanceSnapshot
from router.placement import Placement


class Policy(Protocol):
    name: str

    def pick(self, snapshots: Sequence[InstanceSnapshot], placement: Placement | None = None) -> str: ...


def eligible(snapshots: Sequence[InstanceSnapshot]) -> list[InstanceSnapshot]:
    """The filter step every policy shares: healthy instances that are not draining."""
    chosen = [s for s in snapshots if s.healthy and not s.draining]
    if not chosen:
        draining = " that is not draining" if any(s.draining for s in snapshots) else ""
        raise NoInstance(f"no healthy instance among {len(snapshots)}{draining}; retry when the cluster has recovered")
    return chosen


class RoundRobin:
    """Each eligible instance in turn, in the order of the snapshots."""

    name = "round_robin"

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, snapshots: Sequence[InstanceSnapshot], placement: Placement | None = None) -> str:
        candidates = eligible(snapshots)
        chosen = candidates[self._turn % len(candidates)]
        self._turn += 1
        return chosen.instance_id


class LeastOutstanding:
    """The instance with the fewest unfinished requests; ties go round-robin so equal instances share load."""

    name = "least_outstanding"

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, snapshots: Sequence[InstanceSnapshot], placement: Placement | None = None) -> str:
        candidates = eligible(snapshots)
        fewest = min(s.outstanding for s in candidates)
        tied = [s for s in candidates if s.outstanding == fewest]
        chosen = tied[self._turn % len(tied)]
        self._turn += 1
        return chosen.instance_id


def _length_aware(name: str) -> Callable[[], Policy]:
    def make() -> Policy:
        from router.length_policies import LENGTH_AWARE  # late: those policies build on this module

        return LENGTH_AWARE[name]()

    return make


POLICIES: dict[str, Callable[[], Policy]] = {
    RoundRobin.name: RoundRobin,
    LeastOutstanding.name: LeastOutstanding,
    **{name: _length_aware(name) for name in ("projected_kv", "least_kv", "max_tokens_weighted", "prefix_affinity")},
}


PREFILL_POLICIES = ("round_robin", "least_outstanding", "prefix_affinity")  # those that place prefills


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None
