"""`pdserve sim`: every decode policy at several cluster sizes; a table on stdout, JSON to `--out`.

Without `--rate` each (size, policy) pair gets a goodput search (several runs, a progress bar over them on
stderr); with `--rate` each pair gets one run at that rate (`--requests` of them, default `rate * seconds`;
a progress bar over its arrivals), which is how the 1,000-instance, million-request case is timed.

Engine times are the placeholder `CostModel()` unless `--cost FILE` names a cost file (what `pdserve calibrate`
writes). Either way each decode instance holds the scenario's 24k KV tokens; `--cost-kv` takes the file's
`kv_capacity_tokens` instead (the calibration engine's KV cache, sized by its `--kv-cache-gib`). With `--nodes N`
the instances spread over N nodes, and a KV transfer between two of them costs the request's KV over a
`--link-gbit` link instead of the in-node transfer time (`cost.Links`). Prefills are placed by `--prefill-policy`;
`--turns N` makes the requests the turns of N-turn conversations, `--think-s` apart on average.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from common.roles import Role
from pdserve_tools.sim.compare import DECODE_POLICIES, Goodput, Scenario, goodput, run_policy
from pdserve_tools.sim.cost import CostModel, Links
from pdserve_tools.sim.report import Summary, table
from pdserve_tools.slo import Slo
from router.placement import policy_names

START_RPS_PER_INSTANCE = 8.0  # where the goodput search starts, per decode instance


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--instances", type=int, nargs="+", default=[8, 64, 512], help="decode instances (one or more)")
    p.add_argument("--policy", nargs="+", choices=sorted(DECODE_POLICIES), default=list(DECODE_POLICIES))
    p.add_argument("--rate", type=float, help="one run per size and policy at this rate (req/s), no search")
    p.add_argument("--requests", type=int, help="requests of that one run (default: rate * seconds)")
    p.add_argument("--seconds", type=float, default=20.0, help="arrival window of a run, in simulated seconds")
    p.add_argument("--bisect-steps", type=int, default=4)
    p.add_argument("--slo-ttft-s", type=float, default=2.0)
    p.add_argument("--slo-tpot-ms", type=float, default=50.0)
    p.add_argument("--cost", help="a cost model file (from `pdserve calibrate`); default: the placeholder costs")
    p.add_argument("--cost-kv", action="store_true",
                   help="KV tokens per decode instance from the --cost file, not the scenario's 24k")
    p.add_argument("--lengths", choices=["lognormal", "sharegpt"], default="lognormal",
                   help="request lengths: the synthetic short/long mixture, or ShareGPT conversations' (prompt, "
                        "answer) token counts")
    p.add_argument("--lengths-count", type=int, default=10_000, help="ShareGPT conversations to draw lengths from")
    p.add_argument("--nodes", type=int, default=1, help="nodes the instances spread over (each pool in turn); a KV "
                   "transfer between two nodes crosses the --link-gbit link")
    p.add_argument("--link-gbit", type=float, default=Links().link_gbit, help="bandwidth of the link between two "
                   "nodes, Gbit/s")
    p.add_argument("--kv-bytes-per-token", type=int, help="KV bytes a prompt token moves across a link (default: the "
                   f"--cost file's `transfer.kv_bytes_per_token`, else {Links().kv_bytes_per_token})")
    p.add_argument("--prefill-policy", choices=policy_names(Role.PREFILL), default="prefix_affinity",
                   help="the policy that places prefills")
    p.add_argument("--turns", type=int, default=1, help="turns per conversation: turn k's prompt is the conversation "
                   "so far plus a new user turn (1: independent requests)")
    p.add_argument("--think-s", type=float, default=10.0, help="mean think time between a conversation's turns, s")
    p.add_argument("--out", default="bench-results/sim.json")


def main(args: argparse.Namespace) -> int:
    slo = Slo(args.slo_ttft_s, args.slo_tpot_ms / 1e3)
    scenarios = _scenarios(args, slo)
    first = scenarios[0]
    cost = {"cost_file": args.cost, "cost": asdict(replace(first.cost, kv_capacity_tokens=first.kv_capacity_tokens)),
            "lengths": args.lengths, "length_pairs": len(first.lengths), "links": asdict(first.links),
            "prefill_policy": first.prefill_policy, "turns": first.turns, "think_s": first.think_s}
    if args.rate is not None:
        rows = [_single(s, p, args.rate, args.requests) for s in scenarios for p in args.policy]
        print(f"one run per policy at {args.rate:g} req/s; SLO TTFT {args.slo_ttft_s:g} s, "
              f"TPOT {args.slo_tpot_ms:g} ms")
        print(table(rows))
        _write(args.out, {"mode": "single", "rate_rps": args.rate, **cost, "runs": [asdict(r) for r in rows]})
        return 0
    bar = tqdm(desc="sim runs", unit="run", file=sys.stderr)

    def tick(s: Summary) -> None:
        bar.update()
        bar.set_postfix_str(f"{s.policy} {s.slo_attainment * 100:.0f}% in SLO")

    found = [goodput(s, p, START_RPS_PER_INSTANCE * s.decode_instances, args.bisect_steps, tick)
             for s in scenarios for p in args.policy]
    bar.close()
    print(f"goodput: the highest rate with >= 90% of requests within TTFT {args.slo_ttft_s:g} s and TPOT "
          f"{args.slo_tpot_ms:g} ms; preemptions and TPOT p99 at that rate")
    print(goodput_table(found))
    _write(args.out, {"mode": "goodput", "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s}, **cost,
                      "results": [_goodput_json(g) for g in found], "ratios": ratios(found)})
    return 0


def _scenarios(args: argparse.Namespace, slo: Slo) -> list[Scenario]:
    if args.cost_kv and not args.cost:
        raise SystemExit("--cost-kv takes the KV capacity from a --cost file: name one")
    cost = load_cost(args.cost) if args.cost else CostModel()
    lengths: tuple[tuple[int, int], ...] = ()
    if args.lengths == "sharegpt":
        from pdserve_tools.sim.lengths import sharegpt_lengths

        lengths = sharegpt_lengths(args.lengths_count)
        print(f"lengths of {len(lengths)} ShareGPT conversations (SmolLM2 tokens)", file=sys.stderr)
    try:
        links = Links(args.nodes, args.link_gbit, args.kv_bytes_per_token or kv_bytes_per_token(args.cost))
    except ValueError as e:
        raise SystemExit(f"--nodes, --link-gbit, --kv-bytes-per-token: {e}") from e
    try:
        scenarios = [Scenario(n, seconds=args.seconds, slo=slo, cost=cost, lengths=lengths, links=links,
                              prefill_policy=args.prefill_policy, turns=args.turns, think_s=args.think_s)
                     for n in args.instances]
    except ValueError as e:
        raise SystemExit(f"--turns, --think-s: {e}") from e
    if args.cost_kv:
        scenarios = [replace(s, kv_capacity_tokens=cost.kv_capacity_tokens) for s in scenarios]
    return scenarios


def load_cost(path: str) -> CostModel:
    """The cost model in a file `pdserve calibrate` wrote (or any JSON with the same `"cost"` object)."""
    try:
        return CostModel.from_json(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"cannot use {path} as a cost model: {e}") from e


def kv_bytes_per_token(path: str | None) -> int:
    """KV bytes per token: the cost file's `transfer.kv_bytes_per_token` (what `pdserve calibrate` measured), else
    the placeholder model's."""
    if path is not None:
        document = json.loads(Path(path).read_text())
        transfer = document.get("transfer") if isinstance(document, dict) else None
        if isinstance(transfer, dict) and isinstance(transfer.get("kv_bytes_per_token"), int):
            return int(transfer["kv_bytes_per_token"])
    return Links().kv_bytes_per_token


def _single(scenario: Scenario, policy: str, rate: float, requests: int | None) -> Summary:
    """One run, with a progress bar over its arrivals."""
    total = requests if requests is not None else scenario.config(rate).workload.requests
    with tqdm(total=total, desc=f"{scenario.decode_instances} instances, {policy}", unit="req", file=sys.stderr,
              unit_scale=True) as bar:
        summary = run_policy(scenario, policy, rate, requests, lambda arrived: bar.update(arrived - bar.n))
        bar.update(total - bar.n)
    return summary


def ratios(found: list[Goodput]) -> dict[str, dict[str, float]]:
    """Per size: projected_kv's goodput over each other policy's (absent when either is missing or zero)."""
    out: dict[str, dict[str, float]] = {}
    for size in sorted({g.decode_instances for g in found}):
        by = {g.policy: g.goodput_rps for g in found if g.decode_instances == size}
        mine = by.get("projected_kv", 0.0)
        out[str(size)] = {p: mine / v for p, v in by.items() if p != "projected_kv" and v > 0 and mine > 0}
    return out


def goodput_table(found: list[Goodput]) -> str:
    head = f"{'instances':>9}  {'policy':<20}{'goodput':>10}{'per inst':>9}{'in SLO':>8}{'preempt':>9}{'tpot p99':>10}"
    lines = [head, "-" * len(head)]
    for g in found:
        s = g.at
        slo = f"{s.slo_attainment * 100:.1f}" if s else "-"
        pre = f"{s.preemptions}" if s else "-"
        tpot = f"{s.tpot_p99 * 1e3:.1f}m" if s and not math.isnan(s.tpot_p99) else "-"
        lines.append(f"{g.decode_instances:>9}  {g.policy:<20}{g.goodput_rps:>10.0f}"
                     f"{g.goodput_rps / g.decode_instances:>9.1f}{slo:>8}{pre:>9}{tpot:>10}")
    return "\n".join(lines)


def _goodput_json(g: Goodput) -> dict[str, object]:
    return {"decode_instances": g.decode_instances, "policy": g.policy, "goodput_rps": g.goodput_rps,
            "at": asdict(g.at) if g.at else None, "runs": [{"rate_rps": r, "slo_attainment": a} for r, a in g.runs]}


def _finite(value: Any) -> Any:
    """NaN (a percentile of nothing) is not JSON: null instead."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _write(path: str, data: dict[str, Any]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_finite(data), indent=2) + "\n")
    print(f"wrote {out}")
