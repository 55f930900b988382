"""Prefill placement by queued prompt work with prefix affinity. Pure code over snapshots.

The work a prefill instance would still do before this request's first token is its queued prefill tokens
plus the part of this prompt it does not already hold in its prefix cache. `PrefixAffinity` picks the least
such work; an instance that caches the prompt's prefix wins unless its queue outweighs the saving.

A cache hit saves at most the prompt's hashed blocks, so only instances whose queue is within that saving of
the shortest queue can win or tie; the prefix match is computed for those alone, once per cache object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from common.roles import Role
from router.placement.policy import ANY_ROLE, Need, eligible
from router.placement.query import EMPTY, Placement
from router.placement.snapshot import InstanceSnapshot
from router.placement.sorted_pool import SortedPool


def cached_tokens(placement: Placement, cached: frozenset[int]) -> int:
    """Prompt tokens an instance holds: the longest run of leading prefix hashes it caches, in tokens."""
    hashes = placement.prefix_hashes
    if not hashes or hashes[0] not in cached:
        return 0
    if cached.issuperset(hashes):  # the common cases, a miss or a full hit, without a loop
        blocks = len(hashes)
    else:
        blocks = 1
        while hashes[blocks] in cached:
            blocks += 1
    return min(blocks * placement.block_tokens, placement.prompt_tokens)


def prefill_work(snapshot: InstanceSnapshot, placement: Placement) -> int:
    return snapshot.queued_prefill_tokens + placement.prompt_tokens - cached_tokens(placement, snapshot.cached_prefixes)


def _by_queue(s: InstanceSnapshot) -> tuple[float, InstanceSnapshot]:
    return s.queued_prefill_tokens, s


@dataclass(slots=True)
class PrefixAffinity:
    """Least prompt work before this request's first token: queued prefill tokens plus what it does not cache."""

    name: ClassVar[str] = "prefix_affinity"
    # Any role: `router.policy` accepts it too, and on decode instances (no prefill queue) it takes turns.
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
        scored: list[tuple[int, int]] = []
        hits: dict[int, int] = {}  # cached tokens by cache object: publishers may share equal ones
        for queued, i in self._pool.order:
            if queued > within:
                break
            cached = snapshots[i].cached_prefixes
            hit = hits.get(id(cached))
            if hit is None:
                hit = hits[id(cached)] = cached_tokens(query, cached)
            scored.append((int(queued) + query.prompt_tokens - hit, i))
        best = min(scored)[0]
        tied = sorted(i for work, i in scored if work == best)
        self._turn += 1
        return snapshots[tied[(self._turn - 1) % len(tied)]].instance_id
