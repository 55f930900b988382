"""`python -m pdserve.sim`: one workload, every decode policy, a table. Bounded: a few seconds per policy.

Usage: python -m pdserve.sim [requests] [decode_instances]   (defaults 8000 and 16; prefill instances = half)
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from pdserve.router.kv_placement import LeastKv, MaxTokensWeighted, ProjectedKv
from pdserve.router.policy import LeastOutstanding, Policy, RoundRobin
from pdserve.router.prefill_placement import PrefixAffinity
from pdserve.sim.cost import CostModel
from pdserve.sim.report import summarize, table
from pdserve.sim.simulator import SimConfig, run
from pdserve.sim.workload import WorkloadConfig

DECODE: dict[str, Callable[[], Policy]] = {
    "round_robin": RoundRobin,
    "least_outstanding": LeastOutstanding,
    "least_kv": LeastKv,
    "max_tokens_weighted": MaxTokensWeighted,
    "projected_kv": ProjectedKv,
}


def main(argv: list[str]) -> None:
    requests = int(argv[0]) if argv else 8_000
    decode = int(argv[1]) if len(argv) > 1 else 16
    # Tight KV (24k tokens per decode instance) and a heavy decode load, so placement matters.
    cost = CostModel(kv_capacity_tokens=24_000)
    workload = WorkloadConfig(requests=requests, rate_rps=10.0 * decode, seed=1)
    config = SimConfig(workload, cost, prefill_instances=max(1, decode // 2), decode_instances=decode)
    rows = [summarize(name, run(config, make(), PrefixAffinity())) for name, make in DECODE.items()]
    print(f"{requests} requests, {decode} decode and {config.prefill_instances} prefill instances, "
          f"{workload.rate_rps:.0f} req/s Poisson, prefill policy prefix_affinity; tpot in ms")
    print(table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
