"""What a pdserve target's engines did during one run of `pdserve bench serve`, read from its router's `/metrics`.

Contract. `EngineCounters.parse(text)` keeps, from one scrape, the engines' preemptions so far
(`pdserve_instance_preemptions_total`, summed), the router's legs on decode instances by path so far
(`pdserve_legs_total{path}`: split or whole), and each instance's cumulative `pdserve_engine_step_seconds`
buckets, sum and count. `legs(before, after)` gives the legs by path between two scrapes; `step_times(before,
after)` gives per instance the steps taken between them: `{instance: {"role", "steps", "mean_ms", "p50_ms",
"p99_ms"}}`. The mean is exact (sum over count); p50 and p99 are Prometheus's `histogram_quantile` over the
bucket deltas, so they are as fine as the engine's step buckets (`worker.steps.STEP_BUCKETS`: 1 ms to 10 s). An
instance with no step in the run has None for all three. The counters are as of the router's last heartbeat from
each instance. Pure: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pdserve_tools.bench.router_probe import ENGINE_STEP as STEPS
from pdserve_tools.bench.router_probe import bucket_delta, histogram_quantile

PREEMPTIONS = "pdserve_instance_preemptions"
LEGS = "pdserve_legs"


@dataclass(frozen=True, slots=True)
class StepHistogram:
    role: str
    buckets: list[tuple[float, float]]  # (upper bound, cumulative count), by bound, +Inf last
    total_s: float
    count: float


@dataclass(frozen=True, slots=True)
class EngineCounters:
    preemptions: int
    steps: dict[str, StepHistogram] = field(default_factory=dict)  # by instance
    legs: dict[str, int] = field(default_factory=dict)  # by path

    @staticmethod
    def parse(text: str) -> EngineCounters:
        from prometheus_client.parser import text_string_to_metric_families

        preemptions = 0.0
        buckets: dict[str, list[tuple[float, float]]] = {}
        sums: dict[str, dict[str, float]] = {}
        roles: dict[str, str] = {}
        legs: dict[str, int] = {}
        for family in text_string_to_metric_families(text):
            if family.name == PREEMPTIONS:
                preemptions += sum(s.value for s in family.samples if s.name == f"{PREEMPTIONS}_total")
            elif family.name == LEGS:
                legs.update({s.labels["path"]: int(s.value) for s in family.samples if s.name == f"{LEGS}_total"})
            elif family.name == STEPS:
                for s in family.samples:
                    instance = s.labels["instance"]
                    roles[instance] = s.labels["role"]
                    if s.name == f"{STEPS}_bucket":
                        buckets.setdefault(instance, []).append((float(s.labels["le"]), s.value))
                    else:
                        sums.setdefault(instance, {})[s.name] = s.value
        steps = {i: StepHistogram(roles[i], sorted(b), sums.get(i, {}).get(f"{STEPS}_sum", 0.0),
                                  sums.get(i, {}).get(f"{STEPS}_count", 0.0)) for i, b in buckets.items()}
        return EngineCounters(int(preemptions), steps, legs)


def legs(before: EngineCounters, after: EngineCounters) -> dict[str, int]:
    """Legs placed on decode instances between the two scrapes, by path (split or whole)."""
    return {path: n - before.legs.get(path, 0) for path, n in sorted(after.legs.items())}


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1000, 3)


def step_times(before: EngineCounters, after: EngineCounters) -> dict[str, dict[str, Any]]:
    """Per instance, its engine's steps between the two scrapes: how many, their mean, p50 and p99 in ms."""
    out: dict[str, dict[str, Any]] = {}
    for instance, now in sorted(after.steps.items()):
        then = before.steps.get(instance)
        delta = bucket_delta(then.buckets if then else [], now.buckets)
        count = now.count - (then.count if then else 0.0)
        total = now.total_s - (then.total_s if then else 0.0)
        mean = total / count if count > 0 else math.nan
        out[instance] = {"role": now.role, "steps": int(count), "mean_ms": _ms(mean),
                         "p50_ms": _ms(histogram_quantile(0.5, delta)), "p99_ms": _ms(histogram_quantile(0.99, delta))}
    return out
