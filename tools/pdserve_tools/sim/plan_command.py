"""`pdserve plan`: how many of `--instances` should prefill and how many decode (`sim.plan`), for the simulator's
workload (or ShareGPT's lengths), an SLO and a cost model (the placeholder GPU costs, or `--cost FILE` from
`pdserve calibrate`). Each decode instance holds the simulator's 24k KV tokens. Prints the cost model's estimate
and every split simulated with its goodput and its ratio to the even split, and writes them to `--out` as JSON:
`{"budget", "slo", "policy", "estimate": {...}, "recommended": {"prefill", "decode"}, "goodput_rps": {prefill
instances: req/s}, "ratio_to_even"}`.

    pdserve plan --instances 64 [--cost data/sim/cost-smollm2-135m-instruct-cpu.json --slo-ttft-s 5 --slo-tpot-ms 250]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from pdserve_tools.sim.command import START_RPS_PER_INSTANCE, load_cost
from pdserve_tools.sim.compare import DECODE_POLICIES, Scenario, goodput
from pdserve_tools.sim.cost import CostModel
from pdserve_tools.sim.plan import Plan, Work, estimate, plan
from pdserve_tools.slo import Slo


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--instances", type=int, default=64, help="the budget: prefill and decode instances together")
    p.add_argument("--policy", choices=sorted(DECODE_POLICIES), default="least_outstanding",
                   help="the policy that places decodes in the simulator")
    p.add_argument("--seconds", type=float, default=20.0, help="arrival window of a run, in simulated seconds")
    p.add_argument("--bisect-steps", type=int, default=4)
    p.add_argument("--slo-ttft-s", type=float, default=2.0)
    p.add_argument("--slo-tpot-ms", type=float, default=50.0)
    p.add_argument("--cost", help="a cost model file (from `pdserve calibrate`); default: the placeholder costs")
    p.add_argument("--lengths", choices=["lognormal", "sharegpt"], default="lognormal",
                   help="request lengths: the synthetic short/long mixture, or ShareGPT conversations'")
    p.add_argument("--out", default="bench-results/plan.json")


def table(result: Plan, work: Work) -> str:
    lines = [f"{'prefill':>7} {'decode':>6} {'goodput req/s':>13} {'x even':>7}  note", "-" * 48]
    even = result.goodput_rps.get(result.even, 0.0)
    for p, rps in result.goodput_rps.items():
        notes = [n for n, at in (("estimate", result.estimate), ("recommended", result.recommended),
                                 ("even", result.even)) if at == p]
        ratio = f"{rps / even:.2f}" if even > 0 else "-"
        lines.append(f"{p:>7} {result.budget - p:>6} {rps:>13.2f} {ratio:>7}  {', '.join(notes)}")
    lines.append(f"estimate: {work.prefill_s * 1e3:.1f} ms of prefill and {work.decode_s * 1e3:.1f} ms of decode "
                 f"(batches of {work.batch}) per request, in instance time")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.instances < 2:
        raise SystemExit("--instances: a plan needs at least 2 instances (one per pool)")
    slo = Slo(ttft_s=args.slo_ttft_s, tpot_s=args.slo_tpot_ms / 1000)
    cost = load_cost(args.cost) if args.cost else CostModel()
    lengths: tuple[tuple[int, int], ...] = ()
    if args.lengths == "sharegpt":
        from pdserve_tools.sim.lengths import sharegpt_lengths

        lengths = sharegpt_lengths(10_000)
    base = Scenario(args.instances // 2, seconds=args.seconds, slo=slo, cost=cost, lengths=lengths)
    work = estimate(replace(cost, kv_capacity_tokens=base.kv_capacity_tokens), base.workload(1.0, 1), slo)
    bar = tqdm(desc="splits simulated", unit="split", file=sys.stderr)

    def goodput_at(prefills: int) -> float:
        scenario = replace(base, decode_instances=args.instances - prefills, prefill_instances=prefills)
        found = goodput(scenario, args.policy, START_RPS_PER_INSTANCE * scenario.decode_instances, args.bisect_steps)
        bar.update()
        bar.set_postfix_str(f"{prefills}P{scenario.decode_instances}D {found.goodput_rps:.1f} req/s")
        return found.goodput_rps

    result = plan(args.instances, work.prefill_instances(args.instances), goodput_at)
    bar.close()
    print(f"{args.instances} instances, TTFT <= {args.slo_ttft_s:g} s, TPOT <= {args.slo_tpot_ms:g} ms, decodes "
          f"placed by {args.policy}; goodput: the simulator's, >= 90% of requests within both")
    print(table(result, work))
    ratio = result.ratio_to_even()
    print(f"recommended: {result.recommended} prefill, {args.instances - result.recommended} decode"
          + (f" ({ratio:.2f}x the even split's goodput)" if ratio is not None else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "budget": args.instances, "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s}, "policy": args.policy,
        "cost": args.cost or "placeholder", "lengths": args.lengths, "seconds": args.seconds,
        "estimate": {"prefill_s_per_request": work.prefill_s, "decode_s_per_request": work.decode_s,
                     "decode_batch": work.batch, "prefill_instances": result.estimate},
        "recommended": {"prefill": result.recommended, "decode": args.instances - result.recommended},
        "goodput_rps": {str(p): g for p, g in result.goodput_rps.items()}, "ratio_to_even": ratio,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0
