"""The policy comparison behind `pdserve sim`: goodput under SLO per decode policy and cluster size. Pure.

One cluster shape per size (`Scenario`): `decode_instances` decode and half as many prefill instances (or
`prefill_instances`), tight KV (24k tokens per decode instance) and the mixed short/long workload (or, with
`lengths`, ShareGPT's), so placement matters. Engine times come from the scenario's `cost` (the placeholder
`CostModel()` unless given, e.g. one `pdserve calibrate` fitted); its `kv_capacity_tokens` always gives way to the
scenario's. A run offers `rate * seconds` requests at `rate` (Poisson) and drains them; admission holds a request
no decode instance can take for at most the TTFT SLO, then rejects it (held longer, it would miss the SLO anyway,
and delay those behind it). A run passes when at least `target` of the requests meet both SLOs (TTFT and TPOT).
`goodput` searches the rate (`goodput.highest_passing`) and reports the last run that passed: its rate, preemptions
(KV overflow) and p99 TPOT. Prefills are placed by `prefill_policy` (prefix-aware by default); with `turns` > 1 the
requests are the turns of multi-turn conversations (`workload`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from common.roles import Role
from pdserve_tools.sim.cost import CostModel, Links
from pdserve_tools.sim.goodput import highest_passing
from pdserve_tools.sim.report import DEFAULT_SLO, Summary, summarize
from pdserve_tools.sim.simulator import SimConfig, run
from pdserve_tools.sim.workload import WorkloadConfig
from pdserve_tools.slo import Slo
from router.placement import Policy, make_policy, policy_names
from router.placement.kv import LeastKv, MaxTokensWeighted, ProjectedKv
from router.placement.load import LeastOutstanding, RoundRobin
from router.placement.prefix import PrefixAffinity

DECODE_POLICIES: dict[str, Callable[[], Policy]] = {
    "round_robin": RoundRobin,
    "least_outstanding": LeastOutstanding,
    "least_kv": LeastKv,
    "max_tokens_weighted": MaxTokensWeighted,
    "projected_kv": ProjectedKv,
}


@dataclass(frozen=True, slots=True)
class Scenario:
    decode_instances: int
    kv_capacity_tokens: int = 24_000
    seconds: float = 20.0  # arrival window of one run, in simulated seconds
    slo: Slo = DEFAULT_SLO
    target: float = 0.9  # share of requests that must meet both SLOs
    seed: int = 1
    cost: CostModel = field(default_factory=CostModel)  # engine times; its KV capacity is replaced by the above
    lengths: tuple[tuple[int, int], ...] = ()  # (prompt, output) pairs to draw from; empty: the lognormal mixture
    links: Links = field(default_factory=Links)  # the instances' nodes (default: one node)
    prefill_policy: str = PrefixAffinity.name  # a policy of the placement registry that places prefill instances
    turns: int = 1  # turns per conversation (1: independent requests)
    think_s: float = 10.0  # mean think time between turns
    prefill_instances: int | None = None  # None: half the decode instances (at least one)

    def __post_init__(self) -> None:
        if self.prefill_instances is not None and self.prefill_instances < 1:
            raise ValueError(f"a scenario needs prefill_instances >= 1, got {self.prefill_instances}")
        if self.decode_instances < 1 or self.seconds <= 0 or not 0 < self.target <= 1:
            raise ValueError("a scenario needs decode_instances >= 1, seconds > 0 and 0 < target <= 1")
        if self.prefill_policy not in policy_names(Role.PREFILL):
            raise ValueError(f"prefill_policy must be one of {policy_names(Role.PREFILL)}, got {self.prefill_policy!r}")

    @property
    def prefills(self) -> int:
        """Prefill instances: `prefill_instances`, else half the decode instances (at least one)."""
        return self.prefill_instances if self.prefill_instances is not None else max(1, self.decode_instances // 2)

    def workload(self, rate_rps: float, requests: int) -> WorkloadConfig:
        """The requests of one run: `requests` of them at `rate_rps`."""
        return WorkloadConfig(requests=requests, rate_rps=rate_rps, lengths=self.lengths, seed=self.seed,
                              turns=self.turns, think_s=self.think_s)

    def config(self, rate_rps: float, requests: int | None = None) -> SimConfig:
        count = requests if requests is not None else max(1, round(rate_rps * self.seconds))
        cost = replace(self.cost, kv_capacity_tokens=self.kv_capacity_tokens)
        return SimConfig(self.workload(rate_rps, count), cost, prefill_instances=self.prefills,
                         decode_instances=self.decode_instances, links=self.links,
                         hold_timeout_s=math.inf if self.slo.ttft_s is None else self.slo.ttft_s)


def run_policy(scenario: Scenario, policy: str, rate_rps: float, requests: int | None = None,
               progress: Callable[[int], None] | None = None) -> Summary:
    """One run of `policy` at `rate_rps`; `requests` overrides `rate * seconds`; see `simulator.run`."""
    prefill = make_policy(scenario.prefill_policy)
    result = run(scenario.config(rate_rps, requests), DECODE_POLICIES[policy](), prefill, progress)
    return summarize(policy, result, scenario.slo)


@dataclass(frozen=True, slots=True)
class Goodput:
    decode_instances: int
    policy: str
    goodput_rps: float  # 0.0: no rate searched passed
    at: Summary | None  # the run at `goodput_rps`
    runs: tuple[tuple[float, float], ...]  # (rate, share within SLOs) of every run, in order


def goodput(scenario: Scenario, policy: str, start_rps: float, bisect_steps: int = 4,
            on_run: Callable[[Summary], None] | None = None) -> Goodput:
    summaries: dict[float, Summary] = {}

    def passes(rate: float) -> bool:
        summary = run_policy(scenario, policy, rate)
        summaries[rate] = summary
        if on_run is not None:
            on_run(summary)
        return summary.slo_attainment >= scenario.target

    rate = highest_passing(passes, start_rps, bisect_steps)
    runs = tuple((r, s.slo_attainment) for r, s in summaries.items())
    return Goodput(scenario.decode_instances, policy, rate, summaries.get(rate), runs)
