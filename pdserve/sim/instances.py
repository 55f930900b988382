"""Simulated instances: per-instance state as plain fields and lists, and the snapshots policies read.

Decode runs in *chunks*: the batch stays the same until the next finish, so a chunk of `n` steps is one
event whose duration is an arithmetic sum (`CostModel.steps_s`), never one event per token. A request
landing mid-chunk cuts the chunk at the next step boundary (`cut`), where it joins the batch, as continuous
batching does. KV never exceeds capacity: a chunk ends before the step that would overflow, and if no step
fits the newest request is preempted (its KV freed, recomputed on readmission, as vLLM does).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from pdserve.router.instance import InstanceSnapshot, RequestLoad
from pdserve.router.prediction import remaining
from pdserve.sim.cost import CostModel
from pdserve.sim.workload import SimRequest


@dataclass(slots=True)
class Seq:
    req: SimRequest
    generated: int = 0  # 0 until prefill returns the first token
    recompute: bool = False

    @property
    def tokens(self) -> int:
        return self.req.prompt_tokens + self.generated

    def load(self) -> RequestLoad:
        left = remaining(self.req.prediction, self.generated, self.req.max_tokens)
        return RequestLoad(self.tokens, left.p50, left.p90, self.req.max_tokens - self.generated)


@dataclass(slots=True)
class DecodeState:
    iid: str
    capacity: int
    placed: dict[int, Seq] = field(default_factory=dict)  # every unfinished request placed here
    running: list[Seq] = field(default_factory=list)
    waiting: deque[Seq] = field(default_factory=deque)
    kv: int = 0  # tokens held by `running`
    busy: bool = False
    chunk_start: float = 0.0
    chunk_stall: float = 0.0  # recompute time paid before the chunk's first step
    chunk_steps: int = 0
    version: int = 0
    preemptions: int = 0
    truncations: int = 0

    def snapshot(self) -> InstanceSnapshot:
        loads = tuple(s.load() for s in self.placed.values())
        return InstanceSnapshot(self.iid, "decode", len(self.placed), True, self.capacity, loads)

    def admit(self, cost: CostModel) -> float:
        """Moves waiting requests into the batch while one more step fits; returns recompute time to pay."""
        stall = 0.0
        while self.waiting and self.kv + self.waiting[0].tokens + len(self.running) + 1 <= self.capacity:
            seq = self.waiting.popleft()
            if seq.recompute:
                stall += cost.prefill_s(seq.tokens)
                seq.recompute = False
            self.running.append(seq)
            self.kv += seq.tokens
        return stall

    def start(self, now: float, cost: CostModel) -> float | None:
        """Starts the next chunk; returns when it ends, or None when there is nothing to run."""
        stall = self.admit(cost)
        while self.running and self.kv + len(self.running) > self.capacity:
            if len(self.running) == 1:  # cannot grow even alone: cut it short (a chunk of 0 steps ends it)
                self.truncations += 1
                self.running[0].req.output_tokens = self.running[0].generated
                break
            self._preempt_newest()
        if not self.running:
            self.busy = False
            return None
        batch = len(self.running)
        to_finish = min(s.req.output_tokens - s.generated for s in self.running)
        self.chunk_steps = min(to_finish, (self.capacity - self.kv) // batch)
        self.chunk_start, self.chunk_stall, self.busy = now, stall, True
        self.version += 1
        return now + stall + cost.steps_s(batch, self.kv, self.chunk_steps)

    def cut(self, now: float, cost: CostModel) -> float | None:
        """Ends the running chunk at the next step boundary; returns the new end, or None if unchanged."""
        if not self.busy or self.chunk_steps <= 1:
            return None
        elapsed = now - self.chunk_start - self.chunk_stall
        steps = 1 if elapsed < 0 else cost.steps_done(len(self.running), self.kv, elapsed) + 1
        if steps >= self.chunk_steps:
            return None
        self.chunk_steps = steps
        self.version += 1
        return self.chunk_start + self.chunk_stall + cost.steps_s(len(self.running), self.kv, steps)

    def finish_chunk(self) -> list[Seq]:
        """Applies the chunk's steps; returns the requests that finished (their KV freed)."""
        n = self.chunk_steps
        self.busy = False
        self.kv += n * len(self.running)
        done: list[Seq] = []
        still: list[Seq] = []
        for seq in self.running:
            seq.generated += n
            (done if seq.generated >= seq.req.output_tokens else still).append(seq)
        self.running = still
        for seq in done:
            self.kv -= seq.tokens
            del self.placed[seq.req.rid]
        return done

    def _preempt_newest(self) -> None:
        seq = self.running.pop()
        self.kv -= seq.tokens
        seq.recompute = True
        self.waiting.appendleft(seq)
        self.preemptions += 1


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
    _frozen: frozenset[int] = frozenset()
    _cache_dirty: bool = False

    def snapshot(self) -> InstanceSnapshot:
        if self._cache_dirty:
            self._frozen, self._cache_dirty = frozenset(self.cache), False
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
                self.cache[h] = None
                self.cache.move_to_end(h)
            self._cache_dirty = self._cache_dirty or bool(req.prefix_hashes)
        while len(self.cache) > self.cache_blocks:
            self.cache.popitem(last=False)
        return done
