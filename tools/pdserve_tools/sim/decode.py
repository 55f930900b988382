"""A simulated decode instance: its batch as a step counter, a heap of finish steps and running sums.

Decode runs in *chunks*: the batch stays the same until the next finish, so a chunk of `n` steps is one
event whose duration is an arithmetic sum (`CostModel.steps_s`), never one event per token. A request
landing mid-chunk cuts the chunk at the next step boundary (`cut`), where it joins the batch, as continuous
batching does. KV never exceeds capacity: a chunk ends before the step that would overflow, and if no step
fits the newest request is preempted (its KV freed, recomputed on readmission, as vLLM does).

Nothing here walks the batch per step or per chunk. The instance counts the steps it has run (`step`); a
running request stores `offset = generated - step` when it joins, so it has generated `offset + step` at any
later step, the batch holds `base + len(running) * step` KV tokens (`base`: the sum of `prompt + offset`),
and the step a request finishes at sits in a heap (`ends`). Entries of requests that left the batch early
(preempted, or cut short) stay in the heap and are skipped by their stamp. `profile` summarizes every placed
request for the placement policies in one pass, only when a policy is about to read it; each request keeps
its prompt and prediction shifted by its `offset` (running) or by what it generated (otherwise), so that pass
is a subtraction per column.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from pdserve_tools.sim.cost import CostModel
from pdserve_tools.sim.workload import SimRequest
from router.placement import InstanceSnapshot, RequestLoad
from router.placement.kv import EMPTY_PROFILE, KvProfile, kv_profile
from router.predictor.prediction import remaining


@dataclass(slots=True)
class Seq:
    req: SimRequest
    generated: int = 0  # 0 until prefill returns the first token; while running, see `offset`
    recompute: bool = False
    stamp: int = -1  # >= 0 while running: names its entry in the instance's heap of finish steps
    offset: int = 0  # while running: generated = offset + the instance's step
    # prompt + s, p50 - s, p90 - s and max_tokens - s, with s = offset (running) or generated (otherwise)
    base: int = 0
    p50: int = 0
    p90: int = 0
    left: int = 0

    def __post_init__(self) -> None:
        self.shift(self.generated)

    def shift(self, by: int) -> None:
        req = self.req
        self.base, self.left = req.prompt_tokens + by, req.max_tokens - by
        self.p50, self.p90 = req.prediction.p50 - by, req.prediction.p90 - by

    def set_generated(self, generated: int) -> None:
        """What it generated while not running (the first token, from prefill)."""
        self.generated = generated
        self.shift(generated)

    @property
    def tokens(self) -> int:
        """KV tokens it holds when not running (prompt plus what it generated)."""
        return self.req.prompt_tokens + self.generated

    def load(self, generated: int) -> RequestLoad:
        left = remaining(self.req.prediction, generated, self.req.max_tokens)
        return RequestLoad(self.req.prompt_tokens + generated, left.p50, left.p90, self.req.max_tokens - generated)


@dataclass(slots=True)
class DecodeState:
    iid: str
    capacity: int
    placed: dict[int, Seq] = field(default_factory=dict)  # every unfinished request placed here
    running: dict[int, Seq] = field(default_factory=dict)  # in the batch, oldest first
    pending: dict[int, Seq] = field(default_factory=dict)  # placed and not running: in prefill, transfer or waiting
    waiting: deque[Seq] = field(default_factory=deque)
    ends: list[tuple[int, int, Seq]] = field(default_factory=list)  # heap of (finish step, stamp, request)
    step: int = 0  # decode steps run so far
    base: int = 0  # sum of prompt + offset over `running`
    reserved: int = 0  # sum of prompt + max_tokens over `placed`
    stamps: int = 0
    busy: bool = False
    chunk_start: float = 0.0
    chunk_stall: float = 0.0  # recompute time paid before the chunk's first step
    chunk_steps: int = 0
    version: int = 0
    preemptions: int = 0
    truncations: int = 0

    @property
    def kv(self) -> int:
        """Tokens held by `running`."""
        return self.base + len(self.running) * self.step

    def generated(self, seq: Seq) -> int:
        return seq.offset + self.step if seq.stamp >= 0 else seq.generated

    def place(self, seq: Seq) -> None:
        self.placed[seq.req.rid] = seq
        self.pending[seq.req.rid] = seq
        self.reserved += seq.req.prompt_tokens + seq.req.max_tokens

    def drop(self, seq: Seq) -> None:
        """Forgets a placed request that finished without decoding (its first token was its last)."""
        del self.placed[seq.req.rid]
        self.pending.pop(seq.req.rid, None)
        self.reserved -= seq.req.prompt_tokens + seq.req.max_tokens

    def loads(self) -> tuple[RequestLoad, ...]:
        """Every placed request's load, one by one: what `profile` summarizes (for checks, not the hot path)."""
        return tuple(s.load(self.generated(s)) for s in self.placed.values())

    def profile(self) -> KvProfile:
        if not self.placed:
            return EMPTY_PROFILE
        step, run, rest = self.step, self.running.values(), self.pending.values()
        # `remaining`, inlined: p50 <= p90 <= max_tokens, so both floors are 1 unless nothing is left, which
        # never happens to a running request (it has generated less than its output, hence its max_tokens)
        tokens = [s.base + step for s in run]
        tokens += [s.base for s in rest]
        p50 = [max(s.p50 - step, 1) for s in run]
        p50 += [min(max(s.p50, 1), s.left) for s in rest]
        p90 = [max(s.p90 - step, 1) for s in run]
        p90 += [min(max(s.p90, 1), s.left) for s in rest]
        return kv_profile(tokens, p50, p90, self.reserved)

    def snapshot(self) -> InstanceSnapshot:
        return InstanceSnapshot(self.iid, "decode", len(self.placed), True, self.capacity, profile=self.profile())

    def admit(self, cost: CostModel) -> float:
        """Moves waiting requests into the batch while one more step fits; returns recompute time to pay."""
        stall = 0.0
        while self.waiting and self.kv + self.waiting[0].tokens + len(self.running) + 1 <= self.capacity:
            seq = self.waiting.popleft()
            if seq.recompute:
                stall += cost.prefill_s(seq.tokens)
                seq.recompute = False
            seq.offset = seq.generated - self.step
            seq.shift(seq.offset)
            self.base += seq.base
            del self.pending[seq.req.rid]
            self.running[seq.req.rid] = seq
            self._schedule_end(seq, self.step + seq.req.output_tokens - seq.generated)
        return stall

    def start(self, now: float, cost: CostModel) -> float | None:
        """Starts the next chunk; returns when it ends, or None when there is nothing to run."""
        stall = self.admit(cost)
        while self.running and self.kv + len(self.running) > self.capacity:
            if len(self.running) == 1:  # cannot grow even alone: cut it short (a chunk of 0 steps ends it)
                self.truncations += 1
                seq = next(iter(self.running.values()))
                seq.req.output_tokens = self.generated(seq)
                self._schedule_end(seq, self.step)
                break
            self._preempt_newest()
        if not self.running:
            self.busy = False
            return None
        batch = len(self.running)
        self.chunk_steps = min(self._soonest_end() - self.step, (self.capacity - self.kv) // batch)
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
        self.busy = False
        self.step += self.chunk_steps
        done: list[Seq] = []
        while self.ends and self.ends[0][0] <= self.step:
            _, stamp, seq = heapq.heappop(self.ends)
            if seq.stamp != stamp:
                continue  # it left the batch before this entry came due
            self._leave(seq)
            self.drop(seq)
            done.append(seq)
        return done

    def _schedule_end(self, seq: Seq, at_step: int) -> None:
        self.stamps += 1
        seq.stamp = self.stamps
        heapq.heappush(self.ends, (at_step, seq.stamp, seq))

    def _soonest_end(self) -> int:
        while self.ends[0][1] != self.ends[0][2].stamp:
            heapq.heappop(self.ends)
        return self.ends[0][0]

    def _leave(self, seq: Seq) -> None:
        self.base -= seq.base
        seq.set_generated(seq.offset + self.step)
        seq.stamp = -1
        del self.running[seq.req.rid]

    def _preempt_newest(self) -> None:
        seq = next(reversed(self.running.values()))
        self._leave(seq)
        self.pending[seq.req.rid] = seq
        seq.recompute = True
        self.waiting.appendleft(seq)
        self.preemptions += 1
