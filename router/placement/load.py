"""The policies that read load alone: `RoundRobin` and `LeastOutstanding`. Pure code over snapshots; they place
any role."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from common.roles import Role
from router.placement.policy import ANY_ROLE, Need, eligible
from router.placement.query import Placement
from router.placement.snapshot import InstanceSnapshot


class RoundRobin:
    """Each eligible instance in turn, in the order of the snapshots."""

    name: ClassVar[str] = "round_robin"
    places: ClassVar[frozenset[Role]] = ANY_ROLE
    needs: ClassVar[frozenset[Need]] = frozenset({Need.LOAD})

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, snapshots: Sequence[InstanceSnapshot], placement: Placement | None = None) -> str:
        candidates = eligible(snapshots)
        chosen = candidates[self._turn % len(candidates)]
        self._turn += 1
        return chosen.instance_id


class LeastOutstanding:
    """The instance with the fewest unfinished requests; ties go round-robin so equal instances share load."""

    name: ClassVar[str] = "least_outstanding"
    places: ClassVar[frozenset[Role]] = ANY_ROLE
    needs: ClassVar[frozenset[Need]] = frozenset({Need.LOAD})

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, snapshots: Sequence[InstanceSnapshot], placement: Placement | None = None) -> str:
        candidates = eligible(snapshots)
        fewest = min(s.outstanding for s in candidates)
        tied = [s for s in candidates if s.outstanding == fewest]
        chosen = tied[self._turn % len(tied)]
        self._turn += 1
        return chosen.instance_id
