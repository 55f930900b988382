"""`pdserve bench serve`: the serving benchmark; pdserve and plain vLLM, one after another on the same cores.

Contract. One invocation builds one request set (`--dataset`) and runs every target (`--targets`, see
`serve_targets`; each a server process of its own) in turn: each is started once, warmed up with a few
requests outside the set, then driven with the whole set once per offered rate (`--rate`, several allowed,
`inf` sends all at once) and, with `--search LOW HIGH`, once per probe of `serve_metrics.goodput_search`,
then stopped. Every run sends the same
requests at the same arrival times (gamma gaps with shape `--burstiness`, as vLLM does; 1 is Poisson);
`--max-concurrency N` holds a request that is due until fewer than N are in flight (a closed loop when the
rate is inf). A request's send time is taken when it goes out, so client-side queueing is not in its TTFT.
Every request streams through the same client code; `serve_metrics` turns the traces into TTFT, TPOT, ITL,
end-to-end latency, goodput and SLO attainment with vLLM's definitions.

Output: per rate, a latency table and a throughput table with each target's ratio to the reference target
(`pdserve-disagg`, else the first target listed); for a search, the highest rate meeting the SLO per target;
a JSON file with the arguments, every run's `ServeMetrics.to_json()`, per-request samples (with each chunk's
arrival time) and, for pdserve targets, each instance's engine step times in the run (`serve_engines`), and the
search probes; PNG plots beside it (`plots`).

    pdserve bench serve --rate 0.2 0.5 --requests 40 [--targets ...] [--dataset random --input-len 256]
    pdserve bench serve --search 0.05 1.0 --requests 30 --slo-ttft-ms 5000 --slo-tpot-ms 250
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from pdserve.config import SloConfig, load_config
from pdserve_tools.bench.report import table, write_json
from pdserve_tools.bench.serve_data import add_dataset_arguments, build_requests, describe, warmup_requests
from pdserve_tools.bench.serve_engines import legs, step_times
from pdserve_tools.bench.serve_metrics import (
    RequestTrace,
    SearchConfig,
    SearchResult,
    ServeMetrics,
    goodput_search,
    summarize,
)
from pdserve_tools.bench.serve_targets import CLIENTS, TARGETS, Driver, TargetSpec, engine_counters, started
from pdserve_tools.bench.workload import ArrivalConfig, BenchRequest, arrival_times
from pdserve_tools.slo import Slo

T = TypeVar("T")
REFERENCE = "pdserve-disagg"
HEARTBEAT_S = 1.5  # a little over the router's heartbeat period: engine counters it reports are this fresh


@dataclass(frozen=True)
class Plan:
    """What every target is put through."""

    requests: list[BenchRequest]
    warmup: list[BenchRequest]
    rates: tuple[float, ...]
    arrivals: ArrivalConfig  # its rate_rps is replaced by each run's rate
    max_concurrency: int | None
    timeout: float
    slo: Slo
    search: SearchConfig | None


@dataclass
class Run:
    rate: float
    traces: list[RequestTrace]
    metrics: ServeMetrics
    preemptions: int | None = None  # the target's engines' preemptions during the run (pdserve targets)
    engine_steps: dict[str, dict[str, Any]] | None = None  # per instance, its engine's steps in the run (pdserve)
    legs: dict[str, int] | None = None  # legs on decode instances in the run, by path: split or whole (pdserve)


@dataclass
class TargetResult:
    runs: list[Run] = field(default_factory=list)  # the fixed rates, in order
    search: SearchResult | None = None
    probes: list[Run] = field(default_factory=list)  # the search's runs, in the order run


def converted(text: str, convert: Callable[[str], T], what: str) -> T:
    """An argparse type's first step: `convert(text)`, or an error saying that `text` is not `what`."""
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def parse_rate(text: str) -> float:
    """An argparse type: a positive number of requests per second, or inf."""
    rate = converted(text, float, "a rate (a number of requests per second, or inf)")
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"a rate must be > 0 (inf: all at once), got {text!r}")
    return rate


def parse_finite_rate(text: str) -> float:
    """An argparse type: a finite positive rate (a search's bound, a goodput climb's step)."""
    rate = parse_rate(text)
    if math.isinf(rate):
        raise argparse.ArgumentTypeError("this rate must be finite (inf sends every request at once)")
    return rate


def positive_int(text: str) -> int:
    value = converted(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def rate_key(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def reference_of(targets: Sequence[str]) -> str:
    return REFERENCE if REFERENCE in targets else targets[0]


# ---- running ------------------------------------------------------------------------------------------------


async def run_once(driver: Driver, plan: Plan, rate: float, label: str) -> Run:
    """The request set at one rate: each request waits for its arrival time, then (with a concurrency cap)
    for a free slot, then goes out."""
    arrivals = arrival_times(len(plan.requests), ArrivalConfig(rate, plan.arrivals.burstiness, plan.arrivals.seed))
    slots = asyncio.Semaphore(plan.max_concurrency) if plan.max_concurrency else None
    bar = tqdm(total=len(plan.requests), desc=f"{label} @ {rate_key(rate)} req/s", file=sys.stderr)
    before = await engine_counters(driver)
    start = time.monotonic()

    async def one(request: BenchRequest, at: float) -> RequestTrace:
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))  # the open-loop schedule
        if slots is None:
            trace = await driver.send(request, plan.timeout)
        else:
            async with slots:
                trace = await driver.send(request, plan.timeout)
        bar.update()
        return trace

    try:
        traces = list(await asyncio.gather(*(one(r, at) for r, at in zip(plan.requests, arrivals, strict=True))))
    finally:
        bar.close()
    duration = time.monotonic() - start
    run = Run(rate, traces, summarize(traces, duration, plan.slo))
    if before is not None:
        await asyncio.sleep(HEARTBEAT_S)  # the router's counters are as of its last heartbeat
        after = await engine_counters(driver)
        assert after is not None
        run.preemptions, run.engine_steps = after.preemptions - before.preemptions, step_times(before, after)
        run.legs = legs(before, after)
    return run


def run_to_end(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, with SIGTERM handled as Ctrl-C is: `main` is cancelled, so the target running stops its
    server processes before the benchmark exits (SystemExit, with a message) instead of leaving them behind."""

    async def guarded() -> T:
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await main
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    try:
        return asyncio.run(guarded())
    except asyncio.CancelledError:
        raise SystemExit("stopped by SIGTERM; the target running was stopped") from None


async def warm_up(driver: Driver, plan: Plan, name: str) -> None:
    """A few requests outside the set, so that no run pays the target's first-request costs."""
    for request in plan.warmup:
        trace = await driver.send(request, plan.timeout)
        if not trace.ok:
            raise RuntimeError(f"{name}: a warm-up request failed ({trace.error}); see its logs")


async def bench_target(spec: TargetSpec, plan: Plan) -> TargetResult:
    """Starts the target once, warms it up, runs every rate and the search, stops it."""
    result = TargetResult()
    async with started(spec) as driver:
        await warm_up(driver, plan, spec.name)
        for rate in plan.rates:
            result.runs.append(await run_once(driver, plan, rate, spec.name))
        if plan.search is not None:
            async def probe(rate: float) -> list[RequestTrace]:
                run = await run_once(driver, plan, rate, f"{spec.name} search")
                result.probes.append(run)
                return run.traces

            result.search = await goodput_search(probe, plan.slo, plan.search)
    return result


# ---- report -------------------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.0f}"


def _ratio(mine: float | None, theirs: float | None) -> str:
    if mine is None or theirs is None or math.isnan(mine) or math.isnan(theirs) or theirs == 0:
        return "-"
    return f"{mine / theirs:.2f}"


LATENCY_HEADERS = ["target", "done", "failed", "preempted", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms",
                   "ITL p50 ms", "ITL p99 ms", "E2E p50 s", "E2E p99 s"]


def latency_rows(results: dict[str, ServeMetrics], preempted: dict[str, int | None]) -> list[list[object]]:
    """`preempted`: the engines' preemptions per target ("-" where the target does not report them)."""
    return [[name, m.completed, m.failed, "-" if preempted.get(name) is None else preempted[name],
             _ms(m.ttft.median), _ms(m.ttft.at(99)), _ms(m.tpot.median), _ms(m.tpot.at(99)), _ms(m.itl.median),
             _ms(m.itl.at(99)), f"{m.e2e.median:.2f}", f"{m.e2e.at(99):.2f}"]
            for name, m in results.items()]


def throughput_headers(reference: str) -> list[str]:
    return ["target", "req/s", "out tok/s", "goodput req/s", "SLO met", f"x goodput vs {reference}",
            "x TTFT p99", "x TPOT p99", "x out tok/s"]


def throughput_rows(results: dict[str, ServeMetrics], reference: str) -> list[list[object]]:
    """Each target's throughputs and its ratios to the reference target's goodput, TTFT p99, TPOT p99 and
    output tokens per second ("-" where either side is missing or zero)."""
    ref = results.get(reference)
    rows: list[list[object]] = []
    for name, m in results.items():
        rows.append([
            name, f"{m.request_throughput:.3f}", f"{m.output_throughput:.1f}",
            "-" if m.request_goodput is None else f"{m.request_goodput:.3f}",
            "-" if m.slo_attainment is None else f"{m.slo_attainment:.0%}",
            _ratio(m.request_goodput, ref.request_goodput if ref else None),
            _ratio(m.ttft.at(99), ref.ttft.at(99) if ref else None),
            _ratio(m.tpot.at(99), ref.tpot.at(99) if ref else None),
            _ratio(m.output_throughput, ref.output_throughput if ref else None),
        ])
    return rows


def search_headers(reference: str, target: float) -> list[str]:
    return ["target", f"max req/s with >= {target:.0%} in SLO", "probes", "note", f"x vs {reference}"]


def search_rows(results: dict[str, SearchResult], reference: str) -> list[list[object]]:
    ref = results.get(reference)
    rows: list[list[object]] = []
    for name, s in results.items():
        note = "above the range" if s.saturated else ("below the range" if s.rate_rps is None else "")
        rows.append([name, "-" if s.rate_rps is None else f"{s.rate_rps:.3f}", len(s.probes), note,
                     _ratio(s.rate_rps, ref.rate_rps if ref else None)])
    return rows


def samples_json(traces: Sequence[RequestTrace]) -> dict[str, list[Any]]:
    """Per-request figures, in request order (None where a request failed or has no TPOT). `chunk_times_ms`: per
    request, the client-side arrival of each output chunk after the request was sent, in whole ms (the chunks a
    failed request did receive, too): where its ITL samples came from."""
    def ms(value: float | None) -> float | None:
        return None if value is None else value * 1000

    return {
        "ttfts_ms": [ms(t.ttft) if t.ok else None for t in traces],
        "tpots_ms": [ms(t.tpot) if t.ok else None for t in traces],
        "e2els_ms": [ms(t.e2e) if t.ok else None for t in traces],
        "input_lens": [t.prompt_tokens for t in traces],
        "output_lens": [t.output_tokens for t in traces],
        "errors": [t.error for t in traces],
        "chunk_times_ms": [[round((at - t.send_time) * 1000) for at in t.chunk_times] for t in traces],
    }


def _run_json(run: Run) -> dict[str, Any]:
    return {"rate_rps": rate_key(run.rate), **run.metrics.to_json(), "preemptions": run.preemptions,
            "engine_steps": run.engine_steps, "legs": run.legs, **samples_json(run.traces)}


def to_json(args: argparse.Namespace, plan: Plan, results: dict[str, TargetResult]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "reference": reference_of(list(results)),
        "workload": {"requests": len(plan.requests), "input_tokens": sum(r.prompt_tokens for r in plan.requests),
                     "max_tokens": sum(r.max_tokens for r in plan.requests)},
        "results": {name: {rate_key(run.rate): _run_json(run) for run in r.runs} for name, r in results.items()},
    }
    if plan.search is not None:
        out["search"] = {name: {**r.search.to_json(), "runs": [_run_json(p) for p in r.probes]}
                         for name, r in results.items() if r.search is not None}
    return out


def print_report(plan: Plan, results: dict[str, TargetResult], describe: str) -> None:
    reference = reference_of(list(results))
    slo = plan.slo.to_json()
    cap = f", at most {plan.max_concurrency} in flight" if plan.max_concurrency else ""
    print(f"\n{len(plan.requests)} requests ({describe}), gamma-{plan.arrivals.burstiness:g} arrivals{cap}; "
          f"SLO: TTFT <= {slo['ttft_ms']:g} ms and TPOT <= {slo['tpot_ms']:g} ms")
    for i, rate in enumerate(plan.rates):
        at_rate = {name: r.runs[i].metrics for name, r in results.items()}
        print(f"\n== {rate_key(rate)} req/s ==")
        preempted = {name: r.runs[i].preemptions for name, r in results.items()}
        print(table(LATENCY_HEADERS, latency_rows(at_rate, preempted)))
        print()
        print(table(throughput_headers(reference), throughput_rows(at_rate, reference)))
    if plan.search is not None:
        found = {name: r.search for name, r in results.items() if r.search is not None}
        print(f"\n== goodput search over [{plan.search.low_rps:g}, {plan.search.high_rps:g}] req/s ==")
        print(table(search_headers(reference, plan.search.target), search_rows(found, reference)))


# ---- entry --------------------------------------------------------------------------------------------------


def make_plan(args: argparse.Namespace, requests: list[BenchRequest], warmup: list[BenchRequest]) -> Plan:
    search = None
    if args.search:
        search = SearchConfig(args.search[0], args.search[1], args.search_tolerance, args.search_target)
    rates = tuple(args.rate) if args.rate else (() if search else (1.0,))
    return Plan(requests, warmup, rates, ArrivalConfig(math.inf, args.burstiness, args.seed), args.max_concurrency,
                args.timeout, Slo(ttft_s=args.slo_ttft_ms / 1000, tpot_s=args.slo_tpot_ms / 1000), search)


def main(args: argparse.Namespace) -> int:
    base = load_config(args.config)
    base = dataclasses.replace(base, router=dataclasses.replace(base.router, slo=SloConfig(tpot_ms=args.slo_tpot_ms)))
    logs = Path(args.out).parent / f"{Path(args.out).stem}-logs"
    specs = [TargetSpec(name, base, args.model, args.client, logs, args.in_process) for name in args.targets]
    engine = specs[0].engine
    plan = make_plan(args, build_requests(args, engine, base.router.max_tokens_limit), warmup_requests(args.seed))
    results = {spec.name: run_to_end(bench_target(spec, plan)) for spec in specs}
    print_report(plan, results, describe(args))
    data = to_json(args, plan, results)
    print(f"wrote {write_json(args.out, data)}")
    from pdserve_tools.bench.plots import write_plots

    for path in write_plots(data, Path(args.plots) if args.plots else Path(args.out).parent, Path(args.out).stem):
        print(f"wrote {path}")
    return 0


def add_parser(bsub: Any, func: Any) -> None:
    b = bsub.add_parser("serve", help="serving benchmark: pdserve (1P1D, colocated) and plain vLLM, same cores")
    b.add_argument("--config", help="a serve config whose engine and transfer sections the targets use")
    b.add_argument("--model", help="model folder or name (default: the config's)")
    b.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS,
                   help=f"default: all; ratios are to {REFERENCE} (else the first listed)")
    b.add_argument("--client", default="openai", choices=CLIENTS,
                   help="openai: every target through its OpenAI HTTP port; grpc: pdserve targets through the SDK")
    b.add_argument("--in-process", action="store_true",
                   help="deploy pdserve targets in the benchmark's process (default: `pdserve serve` in its own)")
    add_dataset_arguments(b)
    b.add_argument("--requests", type=positive_int, default=60, help="requests per run (each rate, each search probe)")
    b.add_argument("--rate", type=parse_rate, nargs="+", help="offered rates, req/s (inf: all at once); default 1")
    b.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1 is Poisson")
    b.add_argument("--max-concurrency", type=positive_int, help="at most this many requests in flight (closed loop)")
    b.add_argument("--search", type=parse_finite_rate, nargs=2, metavar=("LOW", "HIGH"),
                   help="find the highest rate in [LOW, HIGH] with --search-target of requests in the SLO")
    b.add_argument("--search-tolerance", type=float, default=0.1, help="req/s; the search stops this close")
    b.add_argument("--search-target", type=float, default=0.9, help="share of requests that must meet the SLO")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    b.add_argument("--slo-tpot-ms", type=float, default=200.0)
    b.add_argument("--timeout", type=float, default=600.0, help="per-request deadline, seconds")
    b.add_argument("--out", default="bench-results/serve.json")
    b.add_argument("--plots", help="folder for the PNG plots (default: the JSON file's)")
    b.set_defaults(func=func)
