"""The `Instance` noun as policies see it: `InstanceSnapshot`, one worker's load at a moment. Plain data.

Fields past `healthy` describe load for length-aware policies (all but `draining`, an operator took the instance
out of placement, and `profile`); their defaults mean "not reported", so a snapshot built with only the first
four fields still works with every policy. `kv_capacity_tokens == 0` means the capacity is unknown (no instance
is filtered out for lack of KV memory).

`cached_prefixes` may be a live view of what the publisher tracks (`router.placement.tracked`): valid for the
pick it is handed to, not to be kept.

`profile` is an optional precomputed summary of `running` (`router.placement.kv.KvProfile`): a publisher that
keeps its load in other forms (the simulator) sets it and may leave `running` empty; policies then read the
profile and never rebuild it per pick. When both are set they must describe the same requests.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.placement.kv import KvProfile


@dataclass(frozen=True, slots=True)
class RequestLoad:
    """One request an instance holds or will hold: KV tokens now and output tokens predicted still to come."""

    tokens: int  # KV tokens held now: prompt plus tokens generated so far
    remaining_p50: int
    remaining_p90: int
    remaining_max: int  # max_tokens minus tokens generated so far: the most it can still grow


@dataclass(frozen=True, slots=True)
class InstanceSnapshot:
    instance_id: str
    role: str  # "colocated", "prefill" or "decode"
    outstanding: int  # requests placed on it and not yet finished
    healthy: bool = True
    kv_capacity_tokens: int = 0  # 0: unknown
    running: tuple[RequestLoad, ...] = ()  # placed and unfinished, whether running, waiting or still in prefill
    queued_prefill_tokens: int = 0  # prompt tokens queued or in progress that still have to be computed
    cached_prefixes: AbstractSet[int] = frozenset()  # prefix hashes (see `Placement`) held in its prefix cache
    draining: bool = False  # taken out of placement by an operator: it finishes what it runs, takes nothing new
    profile: KvProfile | None = None  # `running` summarized; see the module docstring

    @property
    def kv_tokens(self) -> int:
        """KV tokens held now."""
        if self.profile is not None:
            return self.profile.kv_tokens
        return sum(r.tokens for r in self.running)

    @property
    def reserved_tokens(self) -> int:
        """KV tokens held if every request ran to its max_tokens."""
        if self.profile is not None:
            return self.profile.reserved_tokens
        return sum(r.tokens + r.remaining_max for r in self.running)
