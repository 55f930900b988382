"""The P:D planner behind `pdserve plan`: how many instances of a budget should prefill and how many decode, for
a workload, an SLO and a cost model; the estimate is then checked and refined in the simulator. Pure.

Estimate (`estimate`). Per request, the instance-seconds each pool spends on it:
- prefill: the workload's mean `cost.prefill_s(prompt)` (one prompt per batch; batching several only saves
  their shared base cost);
- decode: a request holds one seat of a decode batch for each of its output tokens. An instance runs the
  largest batch whose step keeps the TPOT objective and whose KV fits its capacity (`decode_batch`), so a
  request costs `output * step_s(batch, batch * context) / batch`, `context` being the mean tokens a sequence
  holds halfway through its decode.
The prefill pool gets the prefill share of the budget: P = round(N * prefill / (prefill + decode)), clamped
to [1, N - 1]. The model leaves out queueing and batching, so it is a starting point.

Check (`plan`). `goodput(P)` is the simulator's goodput search at P prefill and N - P decode instances (`compare
.goodput` on the scenario). The planner evaluates the estimate and the even split, then climbs: it tries the
splits one `step` either side of the best so far (step N / 8 at first, halved each time neither is better)
until the step is below one instance. It recommends the split with the highest simulated goodput (the
fewest prefill instances among equals) and reports every split it simulated.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace

from pdserve_tools.sim.cost import CostModel
from pdserve_tools.sim.workload import WorkloadConfig, generate
from pdserve_tools.slo import Slo

SAMPLE_REQUESTS = 4_000  # requests drawn to take the workload's means


@dataclass(frozen=True, slots=True)
class Work:
    """Instance-seconds per request on each side, and the decode batch that sets the decode side's."""

    prefill_s: float
    decode_s: float
    batch: int

    def prefill_instances(self, budget: int) -> int:
        share = self.prefill_s / (self.prefill_s + self.decode_s)
        return min(budget - 1, max(1, round(budget * share)))


def decode_batch(cost: CostModel, context_tokens: float, tpot_s: float | None) -> int:
    """The largest batch (at least 1) whose step keeps `tpot_s` (None: unbounded) and whose sequences of
    `context_tokens` each fit the instance's KV capacity."""
    per_seq = cost.decode_per_seq_s + cost.decode_per_ctx_token_s * context_tokens
    by_kv = max(1, int(cost.kv_capacity_tokens // max(context_tokens, 1.0)))
    if tpot_s is None or per_seq == 0:
        return by_kv
    by_tpot = int((tpot_s - cost.decode_base_s) // per_seq)
    return max(1, min(by_kv, by_tpot))


def estimate(cost: CostModel, workload: WorkloadConfig, slo: Slo) -> Work:
    requests = generate(replace(workload, requests=SAMPLE_REQUESTS))
    prefill = statistics.fmean(cost.prefill_s(r.prompt_tokens) for r in requests)
    output = statistics.fmean(r.output_tokens for r in requests)
    context = statistics.fmean(r.prompt_tokens + r.output_tokens / 2 for r in requests)
    batch = decode_batch(cost, context, slo.tpot_s)
    decode = output * cost.step_s(batch, round(batch * context)) / batch
    return Work(prefill, decode, batch)


@dataclass(frozen=True, slots=True)
class Plan:
    budget: int
    estimate: int  # prefill instances the cost model's estimate gives
    recommended: int  # prefill instances with the highest simulated goodput
    goodput_rps: dict[int, float]  # simulated goodput per number of prefill instances tried

    @property
    def even(self) -> int:
        return self.budget // 2

    def ratio_to_even(self) -> float | None:
        even = self.goodput_rps.get(self.even, 0.0)
        return self.goodput_rps[self.recommended] / even if even > 0 else None


def plan(budget: int, first: int, goodput: Callable[[int], float]) -> Plan:
    """Climbs from the estimate `first` over the splits of `budget` (see the module's text)."""
    if budget < 2:
        raise ValueError(f"a plan needs at least 2 instances (one per pool), got {budget}")
    if not 1 <= first <= budget - 1:
        raise ValueError(f"the first split must lie in [1, {budget - 1}] prefill instances, got {first}")
    found: dict[int, float] = {}

    def tried(p: int) -> float:
        if p not in found:
            found[p] = goodput(p)
        return found[p]

    def best() -> int:
        return max(sorted(found), key=lambda p: found[p])  # the fewest prefill instances among equals

    tried(first)
    tried(budget // 2)
    step = max(1, budget // 8)
    while step >= 1:
        here = best()
        for p in (here - step, here + step):
            if 1 <= p <= budget - 1:
                tried(p)
        if best() == here:
            step //= 2
    return Plan(budget, first, best(), dict(sorted(found.items())))
