"""Decode placement by KV memory: the length-aware policy and two baselines. Pure code over snapshots.

`projected_peak` is the contract the length-aware policy rests on. Every request an instance holds grows by
one KV token per decode step and frees all its KV when it finishes; with `r_i` steps left (the p90 of what it
has left to generate, for safety) and `t_i` tokens now, the instance holds `sum(t_i + k for r_i >= k)` tokens
`k` steps from now. That is a rising line between finishes, so the peak is reached at some `k = r_i`, which
one pass over the requests sorted by `r_i` finds: O(n log n) per instance, no per-step loop.

`ProjectedKv` filters out instances whose projected peak, with the new request, exceeds their capacity,
scores by headroom left at the peak (ties: less predicted remaining work), and picks the best. When every
healthy instance is filtered out it raises `Overloaded` (RESOURCE_EXHAUSTED) with a retry hint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdserve.router.errors import Overloaded
from pdserve.router.instance import InstanceSnapshot, RequestLoad
from pdserve.router.placement import EMPTY, Placement
from pdserve.router.policy import eligible

Score = tuple[float, ...]  # lower is better


def projected_peak(running: Sequence[RequestLoad], new: RequestLoad | None = None) -> int:
    """The most KV tokens the requests will hold at once over the coming steps (p90 lengths), `new` included."""
    loads = [(r.remaining_p90, r.tokens) for r in running]
    if new is not None:
        loads.append((new.remaining_p90, new.tokens))
    loads.sort(reverse=True)
    peak = held = 0
    for count, (steps_left, tokens) in enumerate(loads, start=1):
        held += tokens
        peak = max(peak, held + count * steps_left)
    return peak


def incoming_load(placement: Placement) -> RequestLoad:
    """The load a placed request adds: its prompt now, and its predicted output still to come."""
    length = placement.length
    return RequestLoad(placement.prompt_tokens, length.p50, length.p90, placement.max_tokens)


def pick_lowest(candidates: Sequence[InstanceSnapshot], score: Callable[[InstanceSnapshot], Score], turn: int) -> str:
    """The lowest score wins; equal scores take turns, so equal instances share load."""
    scored = [(score(s), s.instance_id) for s in candidates]
    best = min(sc for sc, _ in scored)
    tied = [iid for sc, iid in scored if sc == best]
    return tied[turn % len(tied)]


@dataclass(slots=True)
class ProjectedKv:
    """Most headroom at the projected peak; refuses (Overloaded) when the request fits nowhere."""

    step_s_estimate: float = 0.03  # seconds per decode step, only to turn steps into a retry hint
    name: str = "projected_kv"
    _turn: int = 0

    def pick(self, snapshots: Sequence[InstanceSnapshot], placement: Placement | None = None) -> str:
        candidates = eligible(snapshots)
        new = incoming_load(placement or EMPTY)
        peaks = {s.instance_id: projected_peak(s.running, new) for s in candidates}
        fitting = [s for s in candidates if s.kv_capacity_tokens <= 0 or peaks[s.instance_id] <= s.kv_capacity_tokens]
        if not fitting:
            raise Overloaded(self._overload_message(candidates, new), retry_after_s=self.retry_hint(candidates))

        def score(s: InstanceSnapshot) -> Score:
            peak = peaks[s.instance_id]
            headroom = s.kv_capacity_tokens - peak if s.kv_capacity_tokens > 0 else -peak
            return (-headroom, sum(r.remaining_p50 for r in s.running))

        chosen = pick_lowest(fitting, score, self._turn)
        self._turn += 1
        return chosen

    def retry_hint(self, candidates: Sequence[InstanceSnapshot]) -> float:
        """Time until the soonest predicted finish anywhere frees some KV (at least one step)."""
        soonest = min((r.remaining_p50 for s in candidates for r in s.running), default=1)
        return max(soonest, 1) * self.step_s_estimate

    @staticmethod
    def _overload_message(candidates: Sequence[InstanceSnapshot], new: RequestLoad) -> str:
        largest = max(s.kv_capacity_tokens for s in candidates)
        return (
            f"no decode instance of {len(candidates)} has KV memory for this request (prompt {new.tokens} tokens, "
            f"up to {new.remaining_p90} output tokens predicted; largest capacity {largest} tokens); retry later, "
            "or send a shorter prompt or a smaller max_tokens"
        )


def capacity_share(tokens: int, s: InstanceSnapshot) -> float:
    """`tokens` as a share of the instance's KV capacity; raw tokens when the capacity is unknown."""
    return tokens / s.kv_capacity_tokens if s.kv_capacity_tokens > 0 else float(tokens)


@dataclass(slots=True)
class LeastKv:
    """Baseline: the lowest share of KV capacity in use now (tokens when capacity is unknown); no projection."""

    name: str = "least_kv"
    _turn: int = 0

    def pick(self, snapshots: Sequence[InstanceSnapshot], placement: Placement | None = None) -> str:
        def score(s: InstanceSnapshot) -> Score:
            return (capacity_share(s.kv_tokens, s),)

        chosen = pick_lowest(eligible(snapshots), score, self._turn)
        self._turn += 1
        return chosen


@dataclass(slots=True)
class MaxTokensWeighted:
    """Baseline: the least KV if every request ran to its max_tokens (what a length-blind reservation sees)."""

    name: str = "max_tokens_weighted"
    _turn: int = 0

    def pick(self, snapshots: Sequence[InstanceSnapshot], placement: Placement | None = None) -> str:
        def score(s: InstanceSnapshot) -> Score:
            return (capacity_share(sum(r.tokens + r.remaining_max for r in s.running), s),)

        chosen = pick_lowest(eligible(snapshots), score, self._turn)
        self._turn += 1
        return chosen
