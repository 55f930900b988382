"""`Policy`: filter -> score -> pick over instance snapshots, and what every policy shares. Pure code.

A policy receives the snapshots of every instance of one role, and optionally the `Placement` of the request
(length-aware policies need it; the others ignore it), and returns the id of the chosen one, or raises
`NoInstance` when none is eligible (`Overloaded` when none can take the request's projected load). Policies
keep no reference to live objects, so the same objects run in the router and in tests (and in the simulator)
unchanged.

A policy declares, as class attributes, its `name` in the config, the roles it may place (`places`) and what it
reads (`needs`). Every snapshot carries an instance's load; the KV detail (capacity, held requests, queued
prefill tokens) costs a pass over the requests each instance holds, so the router builds it only for a policy
that needs more than load (`needs_detail`).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import ClassVar, Protocol

from common.errors import NoInstance
from common.roles import Role
from router.placement.query import Placement
from router.placement.snapshot import InstanceSnapshot


class Need(Enum):
    """What a policy reads of the snapshots and of the request's `Placement`."""

    LOAD = "load"  # outstanding requests, health, draining: every snapshot carries them
    KV = "kv"  # KV capacity and the held requests' loads; the request's prompt and predicted length
    PREFILL_QUEUE = "prefill_queue"  # prompt tokens queued for prefill
    PREFIXES = "prefixes"  # cached prefix hashes; the request's own


DETAIL = frozenset({Need.KV, Need.PREFILL_QUEUE, Need.PREFIXES})  # what a detailed snapshot adds to load
ANY_ROLE = frozenset(Role)
DECODE_ROLES = frozenset({Role.DECODE, Role.COLOCATED})  # those that hold KV while requests decode


class Policy(Protocol):
    name: ClassVar[str]
    places: ClassVar[frozenset[Role]]
    needs: ClassVar[frozenset[Need]]

    def pick(self, snapshots: Sequence[InstanceSnapshot], placement: Placement | None = None) -> str: ...


def needs_detail(policy: Policy) -> bool:
    """Whether the policy reads more of a snapshot than load: its snapshots must then be detailed."""
    return not DETAIL.isdisjoint(policy.needs)


def eligible(snapshots: Sequence[InstanceSnapshot]) -> list[InstanceSnapshot]:
    """The filter step every policy shares: healthy instances that are not draining."""
    chosen = [s for s in snapshots if s.healthy and not s.draining]
    if not chosen:
        draining = " that is not draining" if any(s.draining for s in snapshots) else ""
        raise NoInstance(f"no healthy instance among {len(snapshots)}{draining}; retry when the cluster has recovered")
    return chosen
