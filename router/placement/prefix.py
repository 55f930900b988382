"""Prefill placement by queued prompt work with prefix affinity. Pure code over snapshots.

The work an instance would still do before this request's first token is its queued prefill tokens plus the
part of this prompt it does not already hold in its prefix cache (`router.placement.tracked`). `PrefixAffinity`
picks the least such work, then the fewest outstanding requests; an instance that caches the prompt's prefix
wins unless its queue outweighs the saving. It places prefill instances (disaggregated) and colocated ones.

A cache hit saves at most the prompt's hashed blocks, so only instances whose queue is within that saving of
the shortest queue can win or tie; the prefix match is computed for those alone, once per cache object.
"""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import ClassVar

from common.roles import Role
from router.placement.policy import ANY_ROLE, Need, eligible
from router.placement.query import EMPTY, Placement
from router.placement.snapshot import InstanceSnapshot
from router.placement.sorted_pool import SortedPool
from router.placement.tracked import leading_blocks, skipped_tokens


def cached_tokens(placement: Placement, cached: AbstractSet[int]) -> int:
    """Prompt tokens an instance need not compute: the longest run of leading prefix hashes it caches, in tokens
    (never the prompt's last one)."""
    hashes = placement.prefix_hashes
    if not hashes or hashes[0] not in cached:  # the common miss, without a loop
        return 0
    return skipped_tokens(placement, leading_blocks(hashes, cached))


def uncached_tokens(placement: Placement, cached: AbstractSet[int]) -> int:
    """Prompt tokens an instance caching `cached` computes."""
    return placement.prompt_tokens - cached_tokens(placement, cached)


def prefill_work(snapshot: InstanceSnapshot, placement: Placement) -> int:
    return snapshot.queued_prefill_tokens + uncached_tokens(placement, snapshot.cached_prefixes)


def _by_queue(s: InstanceSnapshot) -> tuple[float, InstanceSnapshot]:
    return s.queued_prefill_tokens, s


@dataclass(slots=True)
class PrefixAffinity:
    """Least prompt work before this request's first token (queued prefill tokens plus what it does not cache),
    then fewest outstanding requests; ties take turns."""

    name: ClassVar[str] = "prefix_affinity"
    # Any role: `router.policy` accepts it too; on decode instances (no prefill queue, no prefix cache) it places
    # by outstanding requests.
    places: ClassVar[frozenset[Role]] = ANY_ROLE
    needs: ClassVar[frozenset[Need]] = frozenset({Need.LOAD, Need.PREFILL_QUEUE, Need.PREFIXES})
    _turn: int = 0
    _pool: SortedPool[InstanceSnapshot] = field(default_factory=lambda: SortedPool(_by_queue))

    def pick(self, snapshots: Sequence[InstanceSnapshot], placement: Placement | None = None) -> str:
        query = placement or EMPTY
        self._pool.update(snapshots)
        if not self._pool.order:
            eligible(snapshots)  # raises NoInstance
        within = self._pool.order[0][0] + min(len(query.prefix_hashes) * query.block_tokens, query.prompt_tokens)
        scored: list[tuple[int, int, int]] = []
        hits: dict[int, int] = {}  # cached tokens by cache object: publishers may share equal ones
        for queued, i in self._pool.order:
            if queued > within:
                break
            cached = snapshots[i].cached_prefixes
            hit = hits.get(id(cached))
            if hit is None:
                hit = hits[id(cached)] = cached_tokens(query, cached)
            scored.append((int(queued) + query.prompt_tokens - hit, snapshots[i].outstanding, i))
        best = min(scored)[:2]
        tied = sorted(i for work, outstanding, i in scored if (work, outstanding) == best)
        self._turn += 1
        return snapshots[tied[(self._turn - 1) % len(tied)]].instance_id
