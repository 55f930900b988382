"""`pdserve bench goodput`: goodput as DistServe measures it, for pdserve and plain vLLM side by side.

Contract. For each target (`--targets`, as in `bench serve`; each started once and warmed up) and each seed
(`--seeds`: its own request set and arrival times), the request set runs at the offered rates (`--rates`)
lowest first, once each (`--requests` at least, and enough to keep arriving for `--min-duration-s`), until a
rate at which every SLO kept fewer than `--target-share` of requests (`goodput_curve.climb`). Each SLO (`--slo
NAME:TTFT_MS:TPOT_MS`, several; loose and tight by default) reads its own attainment curve from the same runs,
and its goodput is the rate where that curve crosses the target share (`max_rate`). A target's goodput per SLO
is the lower median over seeds. Ctrl-C or SIGTERM stops the target running before the benchmark exits.

pdserve targets run with `router.slo.tpot_ms` set to the tightest TPOT objective (what `split_policy: sooner`
keeps).

Output: per SLO, a table of each target's goodput, its seeds' values and its ratios to `vllm-2x` and to the best
plain-vLLM target run; `--out` JSON with `slos`: per SLO `{"name", "slo": {"ttft_ms", "tpot_ms"}, "rates":
{target: req/s or None}, "saturated": {target: bool}, "per_seed": {target: [..]}}`, and `runs` (per target and
seed, each rate's attainment per SLO and its `bench serve` metrics); `{stem}-attainment.png` beside it.

    pdserve bench goodput --seeds 0 1 2 [--targets ...] [--rates 0.5 1 ...] [--requests 24 --min-duration-s 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pdserve.config import SloConfig, load_config
from pdserve_tools.bench.goodput_curve import Goodput, Point, attainment, climb, max_rate, median_goodput
from pdserve_tools.bench.report import table, write_json
from pdserve_tools.bench.serve import (
    Plan,
    Run,
    converted,
    parse_finite_rate,
    positive_int,
    rate_key,
    run_once,
    run_to_end,
    warm_up,
)
from pdserve_tools.bench.serve_data import add_dataset_arguments, build_requests, describe, warmup_requests
from pdserve_tools.bench.serve_metrics import RequestTrace
from pdserve_tools.bench.serve_targets import CLIENTS, PEER_TARGETS, TARGETS, TargetSpec, started
from pdserve_tools.bench.workload import ArrivalConfig
from pdserve_tools.slo import Slo

DEFAULT_TARGETS = ["pdserve-disagg", "pdserve-sooner", "pdserve-colocated", "vllm-2x", "vllm-disagg"]
# DistServe's two kinds of objective. On a fast day of this machine the tight one's TPOT sits about 3x above a
# decode step of SmolLM2 on one core with a few requests in the batch (36-54 ms), its TTFT about 4x a 400-token
# prefill (0.5 s); on a slow day it nears a lone long prompt's latency (docs/benchmarks/goodput.md).
DEFAULT_SLOS = ["loose:5000:250", "tight:2000:150"]
DEFAULT_RATES = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0]
BASELINE = "vllm-2x"


@dataclass(frozen=True)
class NamedSlo:
    name: str
    slo: Slo

    def to_json(self) -> dict[str, float]:
        assert self.slo.ttft_s is not None and self.slo.tpot_s is not None
        return {"ttft_ms": self.slo.ttft_s * 1000, "tpot_ms": self.slo.tpot_s * 1000}


def parse_slo(text: str) -> NamedSlo:
    """An argparse type: NAME:TTFT_MS:TPOT_MS, both objectives > 0."""
    parts = text.split(":")
    usage = f"{text!r}: write NAME:TTFT_MS:TPOT_MS with both objectives > 0 ms, e.g. tight:2000:150"
    if len(parts) != 3 or not parts[0]:
        raise argparse.ArgumentTypeError(usage)
    try:
        ttft_ms, tpot_ms = float(parts[1]), float(parts[2])
    except ValueError:
        raise argparse.ArgumentTypeError(usage) from None
    if not (0 < ttft_ms < math.inf and 0 < tpot_ms < math.inf):
        raise argparse.ArgumentTypeError(usage)
    return NamedSlo(parts[0], Slo(ttft_s=ttft_ms / 1000, tpot_s=tpot_ms / 1000))


def parse_share(text: str) -> float:
    """An argparse type: a share of requests in (0, 1]."""
    value = converted(text, float, "a share (a number in (0, 1])")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a share must lie in (0, 1], got {text!r}")
    return value


def non_negative(text: str) -> float:
    value = converted(text, float, "a number of seconds")
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


@dataclass
class SeedResult:
    points: dict[str, list[Point]]  # per SLO name
    runs: list[Run]


def run_size(rate: float, least: int, min_duration_s: float) -> int:
    """Requests in a run at `rate`: at least `least`, and enough to keep arriving for `min_duration_s`, so that a
    queue a target cannot keep up with grows that long instead of ending with a short burst."""
    return max(least, math.ceil(rate * min_duration_s))


@dataclass(frozen=True)
class Climb:
    """What every target is put through, per seed."""

    plans: Mapping[int, Plan]  # per seed: its request set (enough for the highest rate) and arrival seed
    slos: Sequence[NamedSlo]
    rates: Sequence[float]
    share: float  # of requests that must meet an SLO
    least: int  # requests per run, at least
    min_duration_s: float  # and enough to keep arriving this long

    def requests_at(self, rate: float) -> int:
        return run_size(rate, self.least, self.min_duration_s)


async def bench_target(spec: TargetSpec, climbing: Climb) -> dict[int, SeedResult]:
    """Starts the target once, warms it up, climbs the rates once per seed, stops it. A run at a rate sends the
    first `requests_at(rate)` requests of the seed's set."""
    out: dict[int, SeedResult] = {}
    by_name = {s.name: s.slo for s in climbing.slos}
    async with started(spec) as driver:
        await warm_up(driver, next(iter(climbing.plans.values())), spec.name)
        for seed, plan in climbing.plans.items():
            runs: list[Run] = []

            async def run(rate: float, plan: Plan = plan, label: str = f"{spec.name} seed {seed}",
                          runs: list[Run] = runs) -> list[RequestTrace]:
                sent = dataclasses.replace(plan, requests=plan.requests[:climbing.requests_at(rate)])
                done = await run_once(driver, sent, rate, label)
                runs.append(done)
                shares = ", ".join(f"{s.name} {attainment(done.traces, s.slo):.0%}" for s in climbing.slos)
                tqdm.write(f"{label} @ {rate:g} req/s: {len(sent.requests)} requests, in SLO: {shares}",
                           file=sys.stderr)
                return done.traces

            out[seed] = SeedResult(await climb(run, by_name, climbing.rates, climbing.share), runs)
    return out


def goodputs(results: Mapping[str, Mapping[int, SeedResult]], slo: str, share: float) -> dict[str, list[Goodput]]:
    """Per target, each seed's goodput under one SLO."""
    return {target: [max_rate(r.points[slo], share) for r in seeds.values()] for target, seeds in results.items()}


def _rate(g: Goodput) -> str:
    if g.rate_rps is None:
        return "below"
    return f"{g.rate_rps:.3f}{'+' if g.saturated else ''}"


def _ratio(mine: Goodput, theirs: Goodput | None) -> str:
    if theirs is None or mine.rate_rps is None or not theirs.rate_rps:
        return "-"
    return f"{mine.rate_rps / theirs.rate_rps:.2f}"


def best_peer(medians: Mapping[str, Goodput]) -> Goodput | None:
    peers = [g for name, g in medians.items() if name in PEER_TARGETS and g.rate_rps is not None]
    return max(peers, key=lambda g: g.rate_rps or 0.0, default=None)


def slo_rows(per_seed: Mapping[str, list[Goodput]]) -> list[list[object]]:
    medians = {t: median_goodput(g) for t, g in per_seed.items()}
    best = best_peer(medians)
    return [[t, _rate(m), " ".join(_rate(g) for g in per_seed[t]), _ratio(m, medians.get(BASELINE)), _ratio(m, best)]
            for t, m in medians.items()]


HEADERS = ["target", "goodput req/s (median)", "per seed", f"x {BASELINE}", "x best vLLM"]


def _run_json(run: Run, slos: Sequence[NamedSlo]) -> dict[str, Any]:
    metrics = {k: v for k, v in run.metrics.to_json().items() if k not in ("request_goodput", "slo", "slo_attainment")}
    return {"rate_rps": rate_key(run.rate), "attainment": {s.name: attainment(run.traces, s.slo) for s in slos},
            **metrics, "preemptions": run.preemptions, "engine_steps": run.engine_steps, "legs": run.legs}


def to_json(args: argparse.Namespace, slos: Sequence[NamedSlo], results: Mapping[str, Mapping[int, SeedResult]],
            share: float) -> dict[str, Any]:
    entries = []
    for s in slos:
        per_seed = goodputs(results, s.name, share)
        medians = {t: median_goodput(g) for t, g in per_seed.items()}
        entries.append({"name": s.name, "slo": s.to_json(), "rates": {t: m.rate_rps for t, m in medians.items()},
                        "saturated": {t: m.saturated for t, m in medians.items()},
                        "per_seed": {t: [g.to_json() for g in gs] for t, gs in per_seed.items()}})
    return {"args": {k: v for k, v in vars(args).items() if k not in ("func", "slo")},
            "target_share": share, "slos": entries,
            "runs": {t: {str(seed): [_run_json(run, slos) for run in r.runs] for seed, r in seeds.items()}
                     for t, seeds in results.items()}}


def print_report(args: argparse.Namespace, slos: Sequence[NamedSlo], results: Mapping[str, Mapping[int, SeedResult]],
                 share: float) -> None:
    rates = " ".join(f"{r:g}" for r in sorted(args.rates))
    print(f"\nmax({args.requests}, rate x {args.min_duration_s:g} s) requests per run ({describe(args)}), "
          f"seeds {' '.join(map(str, args.seeds))}, rates {rates} req/s, lowest first until every SLO is missed; "
          f"goodput: the rate keeping >= {share:.0%} of requests in the SLO ('+': every rate run kept it, "
          "'below': the lowest did not)")
    for s in slos:
        slo = s.to_json()
        print(f"\n== {s.name}: TTFT <= {slo['ttft_ms']:g} ms, TPOT <= {slo['tpot_ms']:g} ms ==")
        print(table(HEADERS, slo_rows(goodputs(results, s.name, share))))


def main(args: argparse.Namespace) -> int:
    slos: list[NamedSlo] = args.slo or [parse_slo(s) for s in DEFAULT_SLOS]
    if len({s.name for s in slos}) != len(slos):
        raise SystemExit("bench goodput: every --slo needs a name of its own")
    tightest = min(s.slo.tpot_s or math.inf for s in slos)
    base = load_config(args.config)
    base = dataclasses.replace(base, router=dataclasses.replace(base.router, slo=SloConfig(tpot_ms=tightest * 1000)))
    logs = Path(args.out).parent / f"{Path(args.out).stem}-logs"
    specs = [TargetSpec(name, base, args.model, args.client, logs, args.in_process) for name in args.targets]
    engine = specs[0].engine
    most = run_size(max(args.rates), args.requests, args.min_duration_s)  # the highest rate's run needs the most
    plans = {}
    for seed in args.seeds:
        requests = build_requests(argparse.Namespace(**{**vars(args), "seed": seed, "requests": most}), engine,
                                  base.router.max_tokens_limit)
        plans[seed] = Plan(requests, warmup_requests(seed), (), ArrivalConfig(math.inf, 1.0, seed), None,
                           args.timeout, slos[0].slo, None)
    climbing = Climb(plans, slos, args.rates, args.target_share, args.requests, args.min_duration_s)
    results = {spec.name: run_to_end(bench_target(spec, climbing)) for spec in specs}
    print_report(args, slos, results, args.target_share)
    data = to_json(args, slos, results, args.target_share)
    print(f"wrote {write_json(args.out, data)}")
    from pdserve_tools.bench.plots import write_attainment_plot

    print(f"wrote {write_attainment_plot(data, Path(args.out).with_name(f'{Path(args.out).stem}-attainment.png'))}")
    return 0


def add_parser(bsub: Any, func: Any) -> None:
    b = bsub.add_parser("goodput", help="goodput as DistServe measures it: the highest rate keeping 90%% of requests "
                        "in each SLO, pdserve and plain vLLM side by side")
    b.add_argument("--config", help="a serve config whose engine and transfer sections the targets use")
    b.add_argument("--model", help="model folder or name (default: the config's)")
    b.add_argument("--targets", nargs="+", default=DEFAULT_TARGETS, choices=TARGETS)
    b.add_argument("--client", default="openai", choices=CLIENTS)
    b.add_argument("--in-process", action="store_true",
                   help="deploy pdserve targets in the benchmark's process (default: `pdserve serve` in its own)")
    add_dataset_arguments(b)
    b.add_argument("--requests", type=positive_int, default=24, help="requests per run, at least")
    b.add_argument("--min-duration-s", type=non_negative, default=30.0,
                   help="and enough requests to keep arriving this long at each rate (rate x this)")
    b.add_argument("--rates", type=parse_finite_rate, nargs="+", default=DEFAULT_RATES, help="offered rates, req/s")
    b.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one request set and schedule each")
    b.add_argument("--slo", type=parse_slo, action="append",
                   help=f"NAME:TTFT_MS:TPOT_MS, repeatable (default: {' and '.join(DEFAULT_SLOS)})")
    b.add_argument("--target-share", type=parse_share, default=0.9, help="share of requests that must meet the SLO")
    b.add_argument("--timeout", type=float, default=600.0, help="per-request deadline, seconds")
    b.add_argument("--out", default="bench-results/goodput.json")
    b.set_defaults(func=func)
