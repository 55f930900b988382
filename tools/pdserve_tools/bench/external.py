"""`pdserve bench external`: pdserve and plain vLLM under an outside client's load (guidellm), side by side.

Contract. One invocation makes sure guidellm is in its own virtual environment (`guidellm.ensure_guidellm`, default
`.venv-guidellm`), then runs each target (`TARGETS`) in turn, one at a time on the same cores: it starts the target
(`pdserve serve` through `pdserve_server`, vLLM OpenAI servers through `peers`), warms it up with a few requests
outside the measurement (`pdserve bench serve`'s, plus one of the workload's prompt length), runs guidellm's
concurrent profile once per level (`--streams`, each `--seconds` long; `--runs` times over), and stops it.

Per level and target the figures are the median over the runs of: TTFT p50/p90 and ITL p50/p90 (ms, percentiles
of guidellm's per-request figures, `pdserve_tools.stats.percentile`, over every request that got that far: see
`guidellm.parse_report`), errored requests, and successful requests per second. For pdserve targets the router is
sampled through every level (`router_probe`) and measured over guidellm's measurement window: its process's CPU
time (utime + stime from /proc; `pdserve serve` runs the router in the process it starts as) per token streamed to
guidellm, the p99 of its event-loop lag histogram (`pdserve_event_loop_lag_seconds`), its own mean TTFT
(`pdserve_time_to_first_token_seconds`) beside guidellm's over the same requests (the successful ones), and the
mean engine step per worker role (`pdserve_engine_step_seconds`); the JSON keeps them per level (the median over
the runs), with the highest level's on top.

Output: a progress line per level; a table per level with each target's ratios to `REFERENCE` (vllm-2x); the JSON
file `{"targets": {name: {"levels": [{streams, ttft_p50, ttft_p90, itl_p50, itl_p90, errors, req_per_s}]}},
"router": {name: {cpu_s_per_token, loop_lag_p99_ms, router_ttft_mean_ms, client_ttft_mean_ms, missed_scrapes,
engine_step_ms: {role: ms}, "levels": [{streams, ...the same}]}}}`, rewritten after each target. guidellm's own
reports and logs, and the servers' logs, stay under `--logs`.

    pdserve bench external --seconds 30 --runs 1 [--targets pdserve-1p1d vllm-2x] [--streams 1 4 16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.config import ServeConfig, load_config
from pdserve_tools.bench import guidellm
from pdserve_tools.bench.report import table, write_json
from pdserve_tools.bench.router_probe import SCRAPE_TIMEOUT_S, RouterLoad, RouterProbe, Window
from pdserve_tools.stats import percentile

# Each target: pdserve's serve-bench target of that shape, or (vLLM servers, cores each).
PDSERVE = {"pdserve-1p1d": "pdserve-disagg", "pdserve-colocated": "pdserve-colocated"}
VLLM = {"vllm-1x": (1, 2), "vllm-2x": (2, 1)}
TARGETS = [*PDSERVE, *VLLM]
REFERENCE = "vllm-2x"
STREAMS = (1, 2, 4, 8, 16)
GUIDELLM_GRACE_S = 10.0


@dataclass(frozen=True)
class Plan:
    """What every target is put through."""

    targets: tuple[str, ...]
    streams: tuple[int, ...]
    runs: int
    workload: guidellm.Workload
    exe: Path  # guidellm
    logs: Path


@dataclass(frozen=True, slots=True)
class Level:
    """One concurrency level's figures (ms; req/s)."""

    streams: int
    ttft_p50: float
    ttft_p90: float
    itl_p50: float
    itl_p90: float
    errors: float
    req_per_s: float

    def to_json(self) -> dict[str, float | int | None]:
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class TargetResult:
    levels: list[Level]
    router: dict[int, RouterLoad]  # pdserve targets: streams -> the router's load at that level (median over runs)

    def router_json(self) -> dict[str, Any]:
        """The router's figures at the highest level, and at every level under "levels"."""
        top = self.router[max(self.router)]
        return {**top.to_json(), "levels": [{"streams": streams, **load.to_json()}
                                            for streams, load in sorted(self.router.items())]}


@dataclass(frozen=True)
class Endpoint:
    """A running target: its root URL (guidellm's target) and, for pdserve, its router's process and metrics."""

    name: str
    url: str  # "http://HOST:PORT"
    router_pid: int | None = None
    metrics_url: str | None = None


# ---- pure ----------------------------------------------------------------------------------------------------


def summarize(run: guidellm.LevelRun) -> Level:
    return Level(run.streams, percentile(run.ttfts_ms, 50), percentile(run.ttfts_ms, 90),
                 percentile(run.itls_ms, 50), percentile(run.itls_ms, 90), float(run.errored), run.req_per_s)


def median_level(levels: Sequence[Level]) -> Level:
    """The median of each figure over runs of one level (figures a run could not measure left out)."""
    if not levels or len({lv.streams for lv in levels}) != 1:
        raise ValueError("the median is over runs of one level")

    def med(name: str) -> float:
        return percentile((v for lv in levels if not math.isnan(v := getattr(lv, name))), 50)

    return Level(levels[0].streams, med("ttft_p50"), med("ttft_p90"), med("itl_p50"), med("itl_p90"),
                 med("errors"), med("req_per_s"))


def median_levels(runs: Sequence[Sequence[Level]]) -> list[Level]:
    """Per level (in the first run's order), the median over runs."""
    return [median_level([lv for run in runs for lv in run if lv.streams == first.streams]) for first in runs[0]]


def ratio(mine: float | None, theirs: float | None) -> float | None:
    """mine / theirs; None where either is missing, NaN or zero."""
    if mine is None or theirs is None or math.isnan(mine) or math.isnan(theirs) or theirs == 0:
        return None
    return mine / theirs


def _cell(value: float | None, digits: int = 0) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


LEVEL_HEADERS = ["target", "TTFT p50 ms", "TTFT p90 ms", "ITL p50 ms", "ITL p90 ms", "errors", "req/s",
                 "x TTFT p50", "x TTFT p90", "x ITL p50", "x ITL p90", "x req/s"]


def level_rows(at_level: dict[str, Level], reference: str) -> list[list[object]]:
    """One level: each target's figures and their ratios to the reference target's."""
    ref = at_level.get(reference)
    rows: list[list[object]] = []
    for name, lv in at_level.items():
        ratios = [ratio(getattr(lv, f), getattr(ref, f) if ref else None)
                  for f in ("ttft_p50", "ttft_p90", "itl_p50", "itl_p90", "req_per_s")]
        rows.append([name, _cell(lv.ttft_p50), _cell(lv.ttft_p90), _cell(lv.itl_p50), _cell(lv.itl_p90),
                     _cell(lv.errors), _cell(lv.req_per_s, 3), *(_cell(r, 2) for r in ratios)])
    return rows


def to_json(results: dict[str, TargetResult]) -> dict[str, Any]:
    return {
        "targets": {name: {"levels": [lv.to_json() for lv in r.levels]} for name, r in results.items()},
        "router": {name: r.router_json() for name, r in results.items() if r.router},
    }


def print_report(results: dict[str, TargetResult], streams: Sequence[int]) -> None:
    reference = REFERENCE if REFERENCE in results else next(iter(results))
    for level in streams:
        at_level = {name: lv for name, r in results.items() for lv in r.levels if lv.streams == level}
        print(f"\n== {level} stream{'s' if level > 1 else ''} (x: ratio to {reference}) ==")
        print(table(LEVEL_HEADERS, level_rows(at_level, reference)))
    routers = {name: r.router[max(r.router)] for name, r in results.items() if r.router}
    if routers:
        print(f"\n== pdserve router at {max(streams)} streams ==")
        print(table(["target", "CPU s per token", "event-loop lag p99 ms"],
                    [[n, f"{r.cpu_s_per_token:.6f}", _cell(r.loop_lag_p99_ms, 1)] for n, r in routers.items()]))


# ---- running ---------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(name: str, base: ServeConfig, model: str | None, log_dir: Path) -> AsyncIterator[Endpoint]:
    """Starts target `name`, yields where it answers, stops it."""
    if name in PDSERVE:
        from pdserve_tools.bench.pdserve_server import pdserve_process
        from pdserve_tools.bench.serve_targets import target_data

        data = target_data(base, PDSERVE[name], model)
        async with pdserve_process(data, log_dir / "pdserve.log") as served:
            yield Endpoint(name, served.http_url.removesuffix("/v1"), served.pid, served.metrics_url)
        return
    from pdserve.models import resolve_model
    from pdserve_tools.bench.peers import vllm_openai

    engine = dataclasses.replace(base.engine, model=model) if model else base.engine
    instances, cores = VLLM[name]
    async with vllm_openai(engine, str(resolve_model(engine.model)), instances, cores, log_dir) as url:
        yield Endpoint(name, url.removesuffix("/v1"))


async def warm_up(endpoint: Endpoint, workload: guidellm.Workload) -> None:
    """A few requests before any measurement (the first ones of a fresh engine are slower)."""
    from pdserve_tools.bench.openai_driver import OpenAIDriver
    from pdserve_tools.bench.serve_data import random_workload, warmup_requests
    from pdserve_tools.bench.serve_targets import served_model

    base_url = f"{endpoint.url}/v1"
    requests = [*warmup_requests(0), *random_workload(1, workload.prompt_tokens, 8, 0.0, 7)]
    async with OpenAIDriver(base_url, await served_model(base_url)) as driver:
        for request in requests:
            trace = await driver.send(request, 600.0)
            if not trace.ok:
                raise RuntimeError(f"a warm-up request to {endpoint.url} failed: {trace.error}")


async def run_guidellm(command: list[str], log: Path) -> None:
    """Runs one guidellm level (its output in `log`); stops it if this is cancelled."""
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(*command, stdout=out, stderr=asyncio.subprocess.STDOUT,
                                                       env=guidellm.guidellm_env())
    try:
        code = await process.wait()
    finally:
        if process.returncode is None:
            process.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), GUIDELLM_GRACE_S)
            if process.returncode is None:
                process.kill()
                await process.wait()
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"guidellm exited with code {code}; last lines of {log}:\n{tail}")


def level_seed(run: int, streams: int) -> int:
    """guidellm's seed for one level of one run: the same for every target (the same prompts), a new one for every
    level and run (no prompt a target's prefix cache has seen)."""
    return 1000 * (run + 1) + streams


async def run_level(endpoint: Endpoint, plan: Plan, streams: int, run: int) -> tuple[Level, RouterLoad | None]:
    """One level, one run: guidellm's figures and, for pdserve, the router's load over it (progress on stdout)."""
    stem = plan.logs / endpoint.name / f"guidellm-{streams}-run{run + 1}"
    report = stem.with_suffix(".json")
    command = guidellm.level_command(plan.exe, endpoint.url, streams, plan.workload, report,
                                     level_seed(run, streams))
    probe = await RouterProbe.start(endpoint.router_pid, endpoint.metrics_url) if endpoint.router_pid else None
    started = time.monotonic()
    await run_guidellm(command, stem.with_suffix(".log"))
    (measured,) = guidellm.parse_report(json.loads(report.read_text()))
    window = Window(measured.start, measured.end, measured.output_tokens, measured.finished_ttfts_ms)
    load = await probe.stop(window) if probe is not None else None
    level = summarize(measured)
    print(progress_line(endpoint.name, measured, level, load, time.monotonic() - started), flush=True)
    return level, load


def progress_line(name: str, run: guidellm.LevelRun, level: Level, load: RouterLoad | None, took: float) -> str:
    line = (f"[{name}] {run.streams:>2} streams: TTFT p50 {_cell(level.ttft_p50)} / p90 {_cell(level.ttft_p90)} ms, "
            f"ITL p50 {_cell(level.itl_p50)} ms; {run.successful} done, {run.incomplete} cut off at the end, "
            f"{run.errored} errors; {level.req_per_s:.3f} req/s ({took:.0f} s, load average {os.getloadavg()[0]:.1f})")
    if run.first_error:
        line += f"; first error: {run.first_error[:200]}"
    if load is not None:
        line += (f"; router {load.cpu_s_per_token * 1000:.2f} ms CPU/token, loop lag p99 "
                 f"{_cell(load.loop_lag_p99_ms, 1)} ms, its TTFT mean {_cell(load.router_ttft_mean_ms)} ms vs "
                 f"guidellm's {_cell(load.client_ttft_mean_ms)} ms")
        if load.engine_step_ms:
            line += ", engine step mean " + ", ".join(f"{role} {ms:.1f} ms" for role, ms in load.engine_step_ms.items())
        if load.missed_scrapes:
            line += f"; /metrics unanswered within {SCRAPE_TIMEOUT_S:.0f} s {load.missed_scrapes} times"
    return line


async def bench_target(name: str, plan: Plan, base: ServeConfig, model: str | None) -> TargetResult:
    """Starts the target, warms it up, runs every level `plan.runs` times, stops it."""
    log_dir = plan.logs / name
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"[{name}] starting", flush=True)
    async with serving(name, base, model, log_dir) as endpoint:
        await warm_up(endpoint, plan.workload)
        runs: list[list[Level]] = []
        loads: dict[int, list[RouterLoad]] = {}
        for r in range(plan.runs):
            levels: list[Level] = []
            for streams in plan.streams:
                level, load = await run_level(endpoint, plan, streams, r)
                levels.append(level)
                if load is not None:
                    loads.setdefault(streams, []).append(load)
            runs.append(levels)
        print(f"[{name}] stopping", flush=True)
    return TargetResult(median_levels(runs), {streams: RouterLoad.median(x) for streams, x in loads.items()})


async def bench_all(plan: Plan, base: ServeConfig, model: str | None, out: Path) -> dict[str, TargetResult]:
    results: dict[str, TargetResult] = {}
    for name in plan.targets:
        results[name] = await bench_target(name, plan, base, model)
        write_json(out, to_json(results))  # what is done so far survives a later target's failure
    return results


# ---- entry ---------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    from pdserve.models import resolve_model

    base = load_config(args.config)
    tokenizer = str(resolve_model(args.model or base.engine.model))
    exe = guidellm.ensure_guidellm(Path(args.venv))
    workload = guidellm.Workload(args.prompt_tokens, args.output_tokens, args.seconds, tokenizer)
    plan = Plan(tuple(args.targets), tuple(args.streams), args.runs, workload, exe, Path(args.logs))
    results = asyncio.run(bench_all(plan, base, args.model, Path(args.out)))
    print_report(results, plan.streams)
    print(f"wrote {args.out}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(bsub: Any, func: Any) -> None:
    b = bsub.add_parser("external", help="pdserve and plain vLLM under guidellm's concurrent load, side by side")
    b.add_argument("--targets", nargs="+", default=TARGETS, choices=TARGETS, help="run one at a time, in this order")
    b.add_argument("--streams", nargs="+", type=_positive, default=list(STREAMS), help="concurrency levels")
    b.add_argument("--seconds", type=_positive, default=30, help="guidellm's duration per level")
    b.add_argument("--runs", type=_positive, default=1, help="runs of every level; the figures are their median")
    b.add_argument("--prompt-tokens", type=_positive, default=256)
    b.add_argument("--output-tokens", type=_positive, default=128)
    b.add_argument("--config", help="a serve config whose engine and transfer sections every target uses")
    b.add_argument("--model", help="model folder or name (default: the config's)")
    b.add_argument("--venv", default=".venv-guidellm", help="guidellm's own virtual environment (made if missing)")
    b.add_argument("--out", default="docs/benchmarks/external.json")
    b.add_argument("--logs", default="bench-results/external-logs", help="guidellm's reports and the servers' logs")
    b.set_defaults(func=func)
