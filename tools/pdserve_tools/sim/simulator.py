"""The event loop: requests arrive, the router's policies place them, instances serve them. Deterministic.

Events sit in one heap keyed by (time, sequence number). A request's path is the live one: arrival ->
decode policy (`Overloaded` holds it in a bounded admission queue, or rejects it when that is full or once it
has waited `hold_timeout_s` there) ->
prefill policy -> prefill batch -> first token (TTFT) -> KV transfer (within a node, or over the link between
two: `Links`) -> decode batch -> last token. The policies are the router's own objects and see
`InstanceSnapshot`s rebuilt only for instances whose state changed since the last pick; a decode snapshot is as
of the instance's last event (up to one chunk stale, as a published snapshot would be). A prefill snapshot's
cached prefixes are the router's `TrackedPrefixes` of the instance, fed with each prompt placed there; the
engine's own cache (`PrefillState.cache`) decides what computing costs.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from common.errors import Overloaded
from pdserve_tools.sim.cost import CostModel, Links
from pdserve_tools.sim.decode import DecodeState, Seq
from pdserve_tools.sim.prefill import PrefillState
from pdserve_tools.sim.workload import BLOCK_TOKENS, SimRequest, WorkloadConfig, generate
from router.admission import BoundedQueue
from router.placement import InstanceSnapshot, Placement, Policy

ARRIVE, PREFILL_DONE, KV_LANDED, DECODE_DONE = 0, 1, 2, 3
PROGRESS_EVERY = 10_000


@dataclass(frozen=True, slots=True)
class SimConfig:
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    cost: CostModel = field(default_factory=CostModel)
    prefill_instances: int = 2
    decode_instances: int = 4
    prefill_budget_tokens: int = 8192  # prompt tokens per prefill batch
    prefix_cache_blocks: int = 4096
    hold_per_instance: int = 128  # requests admission holds per decode instance before it rejects
    hold_timeout_s: float = math.inf  # a request held longer is rejected (its retry hint sends it elsewhere)
    links: Links = field(default_factory=Links)  # the instances' nodes: what a KV transfer between them costs

    def __post_init__(self) -> None:
        if self.prefill_instances < 1 or self.decode_instances < 1:
            raise ValueError("the simulated cluster needs at least one prefill and one decode instance")
        largest = self.workload.max_prompt_tokens + self.workload.prefix_tokens + self.workload.max_tokens + 1
        if self.cost.kv_capacity_tokens < largest:
            raise ValueError(f"kv_capacity_tokens must hold the largest request ({largest} tokens)")


@dataclass(slots=True)
class SimResult:
    requests: list[SimRequest]
    first_token_at: list[float]  # nan: never served
    finished_at: list[float]
    finishes: list[int]  # times each request finished: 1 if served, 0 if rejected
    rejected: int = 0
    preemptions: int = 0
    truncations: int = 0
    prefill_tokens: int = 0  # prompt tokens the prefill engines computed (their prefix caches held the rest)
    prefix_blocks: int = 0  # full prompt blocks placed on prefill instances
    prefix_hits: int = 0  # of those, the ones the router tracked on the chosen instance
    min_kv: int = 0
    events: int = 0
    wall_s: float = 0.0


class _Sim:
    def __init__(self, config: SimConfig, decode_policy: Policy, prefill_policy: Policy,
                 progress: Callable[[int], None] | None) -> None:
        self.c, self.cost = config, config.cost
        self.progress = progress
        self.dpol, self.ppol = decode_policy, prefill_policy
        self.reqs = generate(config.workload)
        n = len(self.reqs)
        self.res = SimResult(self.reqs, [math.nan] * n, [math.nan] * n, [0] * n)
        cap = config.cost.kv_capacity_tokens
        self.decode = [DecodeState(f"d{i}", cap) for i in range(config.decode_instances)]
        self.prefill = [PrefillState(f"p{i}", config.prefix_cache_blocks, BLOCK_TOKENS)
                        for i in range(config.prefill_instances)]
        self.didx = {d.iid: i for i, d in enumerate(self.decode)}
        self.pidx = {p.iid: i for i, p in enumerate(self.prefill)}
        self.dsnaps: list[InstanceSnapshot] = [d.snapshot() for d in self.decode]
        self.psnaps: list[InstanceSnapshot] = [p.snapshot() for p in self.prefill]
        self.ddirty: set[int] = set()
        self.pdirty: set[int] = set()
        self.held: BoundedQueue[SimRequest] = BoundedQueue(config.hold_per_instance * config.decode_instances)
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.seq = 0
        self.decode_of: dict[int, int] = {}

    def push(self, at: float, kind: int, idx: int, ver: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (at, self.seq, kind, idx, ver))

    def run(self) -> SimResult:
        started = time.perf_counter()
        if self.reqs:  # arrivals enter the heap one at a time (each pushes the next), so it stays small
            self.push(self.reqs[0].arrival, ARRIVE, 0)
        handlers = (self.on_arrive, self.on_prefill_done, self.on_kv_landed, self.on_decode_done)
        while self.heap:
            now, _, kind, idx, ver = heapq.heappop(self.heap)
            self.res.events += 1
            handlers[kind](now, idx, ver)
        self.res.preemptions = sum(d.preemptions for d in self.decode)
        self.res.truncations = sum(d.truncations for d in self.decode)
        self.res.prefill_tokens = sum(p.computed for p in self.prefill)
        self.res.wall_s = time.perf_counter() - started
        return self.res

    def try_place(self, req: SimRequest, now: float) -> bool:
        placement = Placement(req.prompt_tokens, req.max_tokens, req.prediction, req.prefix_hashes, BLOCK_TOKENS)
        for i in self.ddirty:
            self.dsnaps[i] = self.decode[i].snapshot()
        self.ddirty.clear()
        try:
            d = self.didx[self.dpol.pick(self.dsnaps, placement)]
        except Overloaded:
            return False
        for i in self.pdirty:
            self.psnaps[i] = self.prefill[i].snapshot()
        self.pdirty.clear()
        p = self.pidx[self.ppol.pick(self.psnaps, placement)]
        hit = self.prefill[p].tracked.route(placement)
        self.res.prefix_blocks += hit.blocks
        self.res.prefix_hits += hit.hit
        self.decode[d].place(Seq(req))
        self.decode_of[req.rid] = d
        self.ddirty.add(d)
        self.prefill[p].enqueue(req)
        self.pdirty.add(p)
        end = self.prefill[p].start(now, self.cost, self.c.prefill_budget_tokens)
        if end is not None:
            self.push(end, PREFILL_DONE, p)
        return True

    def on_arrive(self, now: float, rid: int, _: int) -> None:
        if rid + 1 < len(self.reqs):
            self.push(self.reqs[rid + 1].arrival, ARRIVE, rid + 1)
        if self.progress is not None and rid % PROGRESS_EVERY == 0:
            self.progress(rid)
        req = self.reqs[rid]
        self.expire(now)
        if self.held or not self.try_place(req, now):
            try:
                self.held.offer(req)
            except Overloaded:
                self.res.rejected += 1

    def on_prefill_done(self, now: float, p: int, _: int) -> None:
        inst = self.prefill[p]
        for req in inst.finish():
            self.res.first_token_at[req.rid] = now
            self.decode[self.decode_of[req.rid]].placed[req.rid].set_generated(1)
            moved = self.c.links.transfer_s(self.cost, req.prompt_tokens, p, self.decode_of[req.rid])
            self.push(now + moved, KV_LANDED, req.rid)
        self.pdirty.add(p)
        end = inst.start(now, self.cost, self.c.prefill_budget_tokens)
        if end is not None:
            self.push(end, PREFILL_DONE, p)

    def on_kv_landed(self, now: float, rid: int, _: int) -> None:
        d = self.decode_of[rid]
        inst = self.decode[d]
        seq = inst.placed[rid]
        if seq.generated >= seq.req.output_tokens:  # the first token was the last
            inst.drop(seq)
            self.finish([seq], now)
            return
        inst.waiting.append(seq)
        end = inst.cut(now, self.cost) if inst.busy else inst.start(now, self.cost)
        if end is not None:
            self.push(end, DECODE_DONE, d, inst.version)

    def on_decode_done(self, now: float, d: int, ver: int) -> None:
        inst = self.decode[d]
        if ver != inst.version or not inst.busy:
            return  # a chunk that was cut short
        done = inst.finish_chunk()
        self.res.min_kv = min(self.res.min_kv, inst.kv)
        self.ddirty.add(d)
        self.finish(done, now)
        end = inst.start(now, self.cost)
        if end is not None:
            self.push(end, DECODE_DONE, d, inst.version)

    def finish(self, done: list[Seq], now: float) -> None:
        for seq in done:
            self.res.finished_at[seq.req.rid] = now
            self.res.finishes[seq.req.rid] += 1
            self.ddirty.add(self.decode_of.pop(seq.req.rid))
        if done and self.held:
            self.expire(now)
            self.held.drain(lambda r: self.try_place(r, now))

    def expire(self, now: float) -> None:
        """Rejects the held requests that have waited past `hold_timeout_s` (oldest first: the queue is FIFO)."""
        deadline = now - self.c.hold_timeout_s
        self.res.rejected += len(self.held.expire(lambda r: r.arrival < deadline))


def run(config: SimConfig, decode_policy: Policy, prefill_policy: Policy,
        progress: Callable[[int], None] | None = None) -> SimResult:
    """Runs the workload to the end; `progress(arrived)` is called every `PROGRESS_EVERY` arrivals."""
    return _Sim(config, decode_policy, prefill_policy, progress).run()
