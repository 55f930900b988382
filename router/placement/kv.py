"""Decode placement by KV memory: the length-aware policy and two baselines. Pure code over snapshots.

`projected_peak` is the contract the length-aware policy rests on. Every request an instance holds grows by
one KV token per decode step and frees all its KV when it finishes; with `r_i` steps left (the p90 of what it
has left to generate, for safety) and `t_i` tokens now, the instance holds `sum(t_i + k for r_i >= k)` tokens
`k` steps from now. That is a rising line between finishes, so the peak is reached at some `k = r_i`, which
one pass over the requests sorted by `r_i` finds: O(n log n) per instance, no per-step loop.

`KvProfile` is that pass done once per snapshot instead of once per pick: with the requests sorted by `r_i`
(longest first), `V_i = H_i + i * r_i` (`H_i`: tokens of the first `i`) is the hold at the `i`-th finish, and
a new request of `t` tokens and `r` steps, slotting in after the `j` requests with `r_i >= r`, leaves
`V_1..V_j` as they are, adds its own point `H_j + t + (j + 1) * r` and lifts every later `V_i` by `t + r_i`.
With prefix maxima of `V` and suffix maxima of `V_i + r_i` the peak with the new request is one bisection,
O(log n). A snapshot may carry its profile (`InstanceSnapshot.profile`, built by whoever publishes it);
otherwise the policy builds one from `running`.

`ProjectedKv` filters out instances whose projected peak, with the new request, exceeds their capacity,
scores by headroom left at the peak (ties: less predicted remaining work), and picks the best. When every
healthy instance is filtered out it raises `Overloaded` (RESOURCE_EXHAUSTED) with a retry hint. Since a new
request never lowers a peak, `capacity - peak` without it bounds the headroom with it from above: the policy
keeps its instances sorted by that bound (`SortedPool`, re-sorted only where a snapshot changed), walks them
best first, stops once the bound falls below the best exact headroom found, and computes the exact peak only
where two cheaper lower bounds of it (below) leave the instance a chance. A request refused a moment ago is
checked again only against the instances that changed since. The picks are those of scoring every instance.

The baselines keep their instances sorted by their score the same way, so a pick is a bisection.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, islice
from operator import add, attrgetter, itemgetter, mul, neg
from typing import ClassVar, TypeVar

from common.errors import Overloaded
from common.roles import Role
from router.placement.policy import DECODE_ROLES, Need, eligible
from router.placement.query import EMPTY, Placement
from router.placement.snapshot import InstanceSnapshot, RequestLoad
from router.placement.sorted_pool import SortedPool

Score = tuple[float, ...]  # lower is better
Key = TypeVar("Key", float, Score)


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


@dataclass(frozen=True, slots=True)
class KvProfile:
    """One instance's load, summarized for every decode policy; see the module docstring for the arrays."""

    requests: int
    kv_tokens: int  # held now
    reserved_tokens: int  # held if every request ran to its max_tokens
    remaining_p50: int  # predicted output still to come, summed
    soonest_p50: int  # the fewest predicted steps before one of them finishes (0 when it holds none)
    peak: int  # projected_peak of what it holds
    peak_step: int  # steps from now to the peak (the latest, when it is reached more than once)
    next_step: int  # what it holds one step from now: tokens + 1 of every request with a step left
    neg_steps: tuple[int, ...]  # -r_i, ascending (r_i descending), for the bisection
    held: tuple[int, ...]  # H_0..H_n
    prefix_max: tuple[int, ...]  # max(V_1..V_j) for j = 0..n (0 for j = 0)
    suffix_max: tuple[int, ...]  # max(V_i + r_i for i > j) for j = 0..n (0 for j = n)

    def peak_with(self, tokens: int, steps: int) -> int:
        """`projected_peak` of what it holds plus a request of `tokens` tokens and `steps` steps to go."""
        j = bisect_right(self.neg_steps, -steps)
        return max(self.prefix_max[j], self.held[j] + tokens + (j + 1) * steps, self.suffix_max[j] + tokens)


def kv_profile(tokens: Sequence[int], remaining_p50: Sequence[int], remaining_p90: Sequence[int],
               reserved_tokens: int) -> KvProfile:
    """The profile of requests given as parallel columns (request `i`: `tokens[i]`, ...). O(n log n)."""
    pairs = sorted(zip(remaining_p90, tokens, strict=True), reverse=True)  # ties: equal pairs, any order
    steps = list(map(itemgetter(0), pairs))
    held = list(accumulate(map(itemgetter(1), pairs), initial=0))
    # at C speed (this runs once per snapshot of every instance): V_i = H_i + i * r_i, then V_i + r_i
    points = list(map(add, islice(held, 1, None), map(mul, range(1, len(steps) + 1), steps)))
    prefix_max = tuple(accumulate(points, max, initial=0))
    lifted = list(map(add, points, steps))
    lifted.reverse()
    suffix = list(accumulate(lifted, max, initial=0))
    suffix.reverse()
    suffix_max = tuple(suffix)
    neg_steps = tuple(map(neg, steps))
    growing = bisect_right(neg_steps, -1)
    at = prefix_max.index(prefix_max[-1])  # the first point reaching the peak (0: none held)
    return KvProfile(len(pairs), held[-1], reserved_tokens, sum(remaining_p50), min(remaining_p50, default=0),
                     prefix_max[-1], steps[at - 1] if at else 0, held[growing] + growing, neg_steps, tuple(held),
                     prefix_max, suffix_max)


def profile_of(running: Sequence[RequestLoad]) -> KvProfile:
    if not running:
        return EMPTY_PROFILE
    return kv_profile([r.tokens for r in running], [r.remaining_p50 for r in running],
                      [r.remaining_p90 for r in running], sum(r.tokens + r.remaining_max for r in running))


EMPTY_PROFILE = kv_profile((), (), (), 0)


def profile(snapshot: InstanceSnapshot) -> KvProfile:
    """The snapshot's own profile when it carries one, else one built from its `running`."""
    return snapshot.profile if snapshot.profile is not None else profile_of(snapshot.running)


def incoming_load(placement: Placement) -> RequestLoad:
    """The load a placed request adds: its prompt now, and its predicted output still to come."""
    length = placement.length
    return RequestLoad(placement.prompt_tokens, length.p50, length.p90, placement.max_tokens)


def pick_lowest(candidates: Sequence[InstanceSnapshot], score: Callable[[InstanceSnapshot], Score], turn: int) -> str:
    """The lowest score wins; equal scores take turns, so equal instances share load."""
    return lowest(candidates, [score(s) for s in candidates], turn)


def lowest(candidates: Sequence[InstanceSnapshot], scores: Sequence[Key], turn: int) -> str:
    """`pick_lowest` with the scores given, one per candidate in the same order."""
    best = min(scores)
    tied = [s.instance_id for s, sc in zip(candidates, scores, strict=True) if sc == best]
    return tied[turn % len(tied)]


UNKNOWN_FIRST = -(2**62)  # sorts instances of unknown capacity before every known one, and never skips them
Entry = tuple[KvProfile, int, int, int, int]  # profile, capacity, peak_step, peak + peak_step - cap, next_step - cap


def _by_headroom(s: InstanceSnapshot) -> tuple[float, Entry]:
    """Key: minus the headroom left at the peak without a new request (descending upper bound of headroom)."""
    p, capacity = profile(s), s.kv_capacity_tokens
    if capacity <= 0:
        return UNKNOWN_FIRST + p.peak, (p, capacity, p.peak_step, UNKNOWN_FIRST, UNKNOWN_FIRST)
    return p.peak - capacity, (p, capacity, p.peak_step, p.peak + p.peak_step - capacity, p.next_step - capacity)


@dataclass(slots=True)
class ProjectedKv:
    """Most headroom at the projected peak; refuses (Overloaded) when the request fits nowhere."""

    step_s_estimate: float = 0.03  # seconds per decode step, only to turn steps into a retry hint
    name: ClassVar[str] = "projected_kv"
    places: ClassVar[frozenset[Role]] = DECODE_ROLES
    needs: ClassVar[frozenset[Need]] = frozenset({Need.LOAD, Need.KV})
    _turn: int = 0
    _pool: SortedPool[Entry] = field(default_factory=lambda: SortedPool(_by_headroom))
    _refused: tuple[int, int] | None = None  # (tokens, steps) of the last pick's request, when it was refused

    def pick(self, snapshots: Sequence[InstanceSnapshot], placement: Placement | None = None) -> str:
        pool = self._pool
        pool.update(snapshots)
        if not pool.order:
            eligible(snapshots)  # raises NoInstance
        new = incoming_load(placement or EMPTY)
        load = (new.tokens, new.remaining_p90)
        if load == self._refused and pool.changed is not None:
            # The same load just fitted nowhere: only the instances that changed since can take it now.
            found = self._fitting(new, sorted([(k, i) for i in pool.changed if (k := pool.keys[i]) is not None]))
        else:
            found = self._fitting(new, pool.order)
        if not found:
            self._refused = load
            raise Overloaded(self._overload_message(len(pool.order), new), retry_after_s=self._retry_hint())
        self._refused = None
        best = min(found)[:2]
        tied = sorted(i for h, p50, i in found if (h, p50) == best)
        self._turn += 1
        return snapshots[tied[(self._turn - 1) % len(tied)]].instance_id

    def _fitting(self, new: RequestLoad, order: list[tuple[float, int]]) -> list[tuple[int, int, int]]:
        """(-headroom, remaining p50, position) of the instances in `order` (a part of the pool's, or all of it,
        ascending) that fit `new` and may be the best or tie."""
        t, r = new.tokens, new.remaining_p90
        first = t + 1 if r >= 1 else 0
        found: list[tuple[int, int, int]] = []
        floor = 0  # a known capacity fits with headroom >= 0 only, and must reach the best found so far
        items = self._pool.items
        for key, i in order:
            if key > -floor:
                break  # the order is by this upper bound of the headroom: nothing after can fit or tie
            entry = items[i]
            assert entry is not None
            p, capacity, peak_step, at_peak, next_step = entry
            # Lower bounds of the peak with `new`: still running at the old peak's step, it adds t + k
            # there; else the old peak stands, and one step from now it holds `new` on top of `next_step`.
            if (-at_peak - t if r >= peak_step > 0 else -next_step - first) < floor:
                continue
            peak = p.peak_with(t, r)
            if capacity <= 0:
                found.append((peak, p.remaining_p50, i))
            elif peak <= capacity:
                found.append((peak - capacity, p.remaining_p50, i))
                floor = max(floor, capacity - peak)
        return found

    def retry_hint(self, candidates: Sequence[InstanceSnapshot]) -> float:
        """Time until the soonest predicted finish anywhere frees some KV (at least one step)."""
        soonest = min((p.soonest_p50 for p in map(profile, candidates) if p.requests), default=1)
        return max(soonest, 1) * self.step_s_estimate

    def _retry_hint(self) -> float:
        """`retry_hint` of the pool's eligible instances, at C speed (a refusal can come once per finish)."""
        held = filter(attrgetter("requests"), map(itemgetter(0), filter(None, self._pool.items)))
        return max(min(map(attrgetter("soonest_p50"), held), default=1), 1) * self.step_s_estimate

    def _overload_message(self, candidates: int, new: RequestLoad) -> str:
        largest = max(map(itemgetter(1), filter(None, self._pool.items)))
        return (
            f"no decode instance of {candidates} has KV memory for this request (prompt {new.tokens} tokens, "
            f"up to {new.remaining_p90} output tokens predicted; largest capacity {largest} tokens); retry later, "
            "or send a shorter prompt or a smaller max_tokens"
        )


def capacity_share(tokens: int, s: InstanceSnapshot) -> float:
    """`tokens` as a share of the instance's KV capacity; raw tokens when the capacity is unknown."""
    return tokens / s.kv_capacity_tokens if s.kv_capacity_tokens > 0 else float(tokens)


def _lowest_in_pool(pool: SortedPool[None], snapshots: Sequence[InstanceSnapshot], turn: int) -> str:
    """The lowest key wins; equal keys (a run at the front of the order) take turns."""
    pool.update(snapshots)
    if not pool.order:
        eligible(snapshots)  # raises NoInstance
    best = pool.order[0][0]
    ties = bisect_right(pool.order, (best, len(snapshots)))
    return snapshots[pool.order[turn % ties][1]].instance_id


def _kv_share(s: InstanceSnapshot) -> tuple[float, None]:
    return capacity_share(s.kv_tokens, s), None


def _reserved_share(s: InstanceSnapshot) -> tuple[float, None]:
    return capacity_share(s.reserved_tokens, s), None


@dataclass(slots=True)
class LeastKv:
    """Baseline: the lowest share of KV capacity in use now (tokens when capacity is unknown); no projection."""

    name: ClassVar[str] = "least_kv"
    places: ClassVar[frozenset[Role]] = DECODE_ROLES
    needs: ClassVar[frozenset[Need]] = frozenset({Need.LOAD, Need.KV})
    _turn: int = 0
    _pool: SortedPool[None] = field(default_factory=lambda: SortedPool(_kv_share))

    def pick(self, snapshots: Sequence[InstanceSnapshot], placement: Placement | None = None) -> str:
        chosen = _lowest_in_pool(self._pool, snapshots, self._turn)
        self._turn += 1
        return chosen


@dataclass(slots=True)
class MaxTokensWeighted:
    """Baseline: the least KV if every request ran to its max_tokens (what a length-blind reservation sees)."""

    name: ClassVar[str] = "max_tokens_weighted"
    places: ClassVar[frozenset[Role]] = DECODE_ROLES
    needs: ClassVar[frozenset[Need]] = frozenset({Need.LOAD, Need.KV})
    _turn: int = 0
    _pool: SortedPool[None] = field(default_factory=lambda: SortedPool(_reserved_share))

    def pick(self, snapshots: Sequence[InstanceSnapshot], placement: Placement | None = None) -> str:
        chosen = _lowest_in_pool(self._pool, snapshots, self._turn)
        self._turn += 1
        return chosen
