"""A simulated prefill instance: a FIFO of prompts, batched up to a token budget, and an LRU prefix cache.

A batch takes queued prompts in order while their uncached tokens fit the budget (always at least one); it
ends after one batch step of the cost model. The engine's cache (`cache`) is what computing costs: prompts'
prefix blocks enter it when their batch ends, last block first, and it evicts the least recently used blocks
beyond its size, as vLLM's does; an engine computes at least a prompt's last token. The snapshot is what the
router sees: `queued_prefill_tokens` counts the uncached tokens estimated at enqueue time, until the batch
holding the prompt ends, and `cached_prefixes` is the router's own `TrackedPrefixes` of the instance (`tracked`),
learned from the prompts placed there, as live.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from pdserve_tools.sim.cost import CostModel
from pdserve_tools.sim.workload import SimRequest
from router.placement import InstanceSnapshot
from router.placement.tracked import TrackedPrefixes, leading_blocks


@dataclass(slots=True)
class PrefillState:
    iid: str
    cache_blocks: int  # prefix-cache size, in blocks of prompt
    block_tokens: int
    queue: deque[SimRequest] = field(default_factory=deque)
    batch: list[SimRequest] = field(default_factory=list)
    queued_tokens: int = 0
    estimates: dict[int, int] = field(default_factory=dict)  # rid -> uncached tokens counted in queued_tokens
    cache: OrderedDict[int, None] = field(default_factory=OrderedDict)  # the engine's, least recently used first
    tracked: TrackedPrefixes = field(init=False)  # the router's view of `cache`
    computed: int = 0  # prompt tokens computed

    def __post_init__(self) -> None:
        self.tracked = TrackedPrefixes(self.cache_blocks)

    def snapshot(self) -> InstanceSnapshot:
        n = len(self.queue) + len(self.batch)
        return InstanceSnapshot(self.iid, "prefill", n, True, 0, (), self.queued_tokens, self.tracked.held)

    def uncached(self, req: SimRequest) -> int:
        blocks = leading_blocks(req.prefix_hashes, self.cache.keys())
        usable = max(0, req.prompt_tokens - 1) // self.block_tokens
        return req.prompt_tokens - min(blocks, usable) * self.block_tokens

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
            self.computed += work
            duration += cost.prefill_s(work) - cost.prefill_base_s
            self.batch.append(req)
        return now + duration

    def finish(self) -> list[SimRequest]:
        done, self.batch = self.batch, []
        for req in done:
            self.queued_tokens -= self.estimates.pop(req.rid)
            for h in reversed(req.prefix_hashes):
                if h in self.cache:
                    self.cache.move_to_end(h)
                else:
                    self.cache[h] = None
        while len(self.cache) > self.cache_blocks:
            self.cache.popitem(last=False)
        return done
