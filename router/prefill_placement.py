"""Prefill placement by queued prompt work with prefix affinity. Pure code over snapshots.

The work a prefill instance would still do before this request's first token is its queued prefill tokens
plus the part of this prompt it does not already hold in its prefix cache. `PrefixAffinity` picks the least
such work; an instance that caches the prompt's prefix wins unless its queue outweighs the saving.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.router.instance import InstanceSnapshot
from pdserve.router.kv_placement import Score, pick_lowest
from pdserve.router.placement import EMPTY, Placement
from pdserve.router.policy import eligible


def cached_tokens(placement: Placement, cached: frozenset[int]) -> int:
    """Prompt tokens an instance holds: the longest run of leading prefix hashes it caches, in tokens."""
    blocks = 0
    for h in placement.prefix_hashes:
        if h not in cached:
            break
        blocks += 1
    return min(blocks * placement.block_tokens, placement.prompt_tokens)


def prefill_work(snapshot: InstanceSnapshot, placement: Placement) -> int:
    return snapshot.queued_prefill_tokens + placement.prompt_tokens - cached_tokens(placement, snapshot.cached_prefixes)


@dataclass(slots=True)
class PrefixAffinity:
    name: str = "prefix_affinity"
    _turn: int = 0

    def pick(self, snapshots: Sequence[InstanceSnapshot], placement: Placement | None = None) -> str:
        query = placement or EMPTY

        def score(s: InstanceSnapshot) -> Score:
            return (float(prefill_work(s, query)),)

        chosen = pick_lowest(eligible(snapshots), score, self._turn)
        self._turn += 1
        return chosen
