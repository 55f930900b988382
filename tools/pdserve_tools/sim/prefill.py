"""A simulated prefill instance: a FIFO of prompts, batched up to a token budget, and an LRU prefix cache.

A batch takes queued prompts in order while their uncached tokens fit the budget (always at least one); it
ends after one batch step of the cost model. Prompts' prefix blocks enter the cache when their batch ends;
the cache evicts the least recently used blocks beyond its size. The snapshot's `queued_prefill_tokens`
counts the uncached tokens estimated at enqueue time, until the batch holding the prompt ends. Its
`cached_prefixes` is rebuilt only when the set of cached blocks changed, and instances holding the same set
share one object (`shared`), so a policy can score equal caches once.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from pdserve_tools.sim.cost import CostModel
from pdserve_tools.sim.workload import SimRequest
from router.placement import InstanceSnapshot


@dataclass(slots=True)
class PrefillState:
    iid: str
    cache_blocks: int  # prefix-cache size, in blocks of prompt
    block_tokens: int
    queue: deque[SimRequest] = field(default_factory=deque)
    batch: list[SimRequest] = field(default_factory=list)
    queued_tokens: int = 0
    estimates: dict[int, int] = field(default_factory=dict)  # rid -> uncached tokens counted in queued_tokens
    cache: OrderedDict[int, None] = field(default_factory=OrderedDict)
    shared: dict[frozenset[int], frozenset[int]] = field(default_factory=dict)  # one object per distinct set
    _frozen: frozenset[int] = frozenset()
    _cache_dirty: bool = False

    def snapshot(self) -> InstanceSnapshot:
        if self._cache_dirty:
            cached = frozenset(self.cache)
            self._frozen, self._cache_dirty = self.shared.setdefault(cached, cached), False
        n = len(self.queue) + len(self.batch)
        return InstanceSnapshot(self.iid, "prefill", n, True, 0, (), self.queued_tokens, self._frozen)

    def uncached(self, req: SimRequest) -> int:
        blocks = 0
        for h in req.prefix_hashes:
            if h not in self.cache:
                break
            blocks += 1
        return req.prompt_tokens - min(blocks * self.block_tokens, req.prompt_tokens)

    def enqueue(self, req: SimRequest) -> None:
        est = self.uncached(req)
        self.estimates[req.rid] = est
        self.queued_tokens += est
        self.queue.append(req)

    def start(self, now: float, cost: CostModel, budget_tokens: int) -> float | None:
        """Takes queued prompts up to `budget_tokens` (at least one) as one batch; returns when it ends."""
        if self.batch or not self.queue:
            return None
        spent, duration = 0, cost.prefill_base_s
        while self.queue and (not self.batch or spent + self.uncached(self.queue[0]) <= budget_tokens):
            req = self.queue.popleft()
            work = self.uncached(req)
            spent += work
            duration += cost.prefill_s(work) - cost.prefill_base_s
            self.batch.append(req)
        return now + duration

    def finish(self) -> list[SimRequest]:
        done, self.batch = self.batch, []
        for req in done:
            self.queued_tokens -= self.estimates.pop(req.rid)
            for h in req.prefix_hashes:
                if h in self.cache:
                    self.cache.move_to_end(h)
                else:
                    self.cache[h] = None
                    self._cache_dirty = True
        while len(self.cache) > self.cache_blocks:
            self.cache.popitem(last=False)
            self._cache_dirty = True
        return done
