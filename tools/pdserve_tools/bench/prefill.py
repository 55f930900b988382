"""`pdserve bench prefill`: one prompt's prefill inside pdserve against a plain vLLM engine with the same arguments
on the same core, per prompt length.

Contract. For each length of `--lengths`, `--reps` prompts of random token ids (`serve_data.TOKEN_RANGE`, one seed
per length and rep, the same prompts for every target, none repeated, so no prefix cache helps) go one at a time,
with `max_tokens` 1, to each target in turn; each target first gets `WARMUP` prompts of its own. Targets:

- `vllm`: the served engine's arguments (`pdserve_tools.engine.offline_engine`, prefix caching as served) as a
  `vllm.LLM` in a process of its own, its OpenMP threads on core 0, the other cores idle. Its prefill time is the
  wall time of one `generate` call (which adds the engine core's IPC, about a millisecond, to the step).
- `vllm-inproc`: the same, with the engine in the calling process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) as
  `pdserve calibrate` measures it: no engine core process of its own, no IPC.
- `pdserve-1p1d`: `pdserve serve` in the default layout (prefill instance on core 0, decode on core 1), through
  the gRPC SDK. With `max_tokens` 1 the prefill instance answers the whole request, and still streams the prompt's
  KV to the decode instance while it computes, as for any request.
- `pdserve-colocated`: two colocated instances, one core each: no KV leaves the engine.

For pdserve, three figures per prompt: `prefill_ms`, the engine's own scheduled-to-first-token time (the
`prefill_compute` phase); `step_ms`, the prefilling instances' mean engine step over the length's prompts
(`pdserve_engine_step_seconds`, one step per prompt, read once the router's counters have settled after the
length's last prompt); `client_ms`, the SDK's call from send to the final chunk.

Per length and target, the median over the reps. `ratio` is, per pdserve target, its `prefill_ms` over vLLM's.
`cost_model_ms` is what the simulator's cost file (`--cost`, from `pdserve calibrate`) predicts for one prefill
of each length, and `cost_model_x_step`, per pdserve target, that prediction over the live `step_ms`. The JSON:
`{"model", "lengths", "reps", "targets": {target: {"prefill_ms": [...], ...}}, "ratio": {target: [...]},
"cost_model_ms": [...], "cost_model_x_step": {target: [...]}}`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import multiprocessing
import random
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from pdserve.config import EngineConfig, ServeConfig, load_config
from pdserve_tools.bench.report import table, write_json
from pdserve_tools.bench.serve_data import TOKEN_RANGE

LENGTHS = (100, 250, 400, 766)
WARMUP = 2
# pdserve's targets: their `bench serve` layout and the role of the instances that prefill
PDSERVE = {"pdserve-1p1d": ("pdserve-disagg", "prefill"), "pdserve-colocated": ("pdserve-colocated", "colocated")}
TARGETS = ("vllm", "vllm-inproc", *PDSERVE)
HEARTBEAT_WAIT_S = 30.0  # the router's step counters follow the instances' heartbeats
SETTLE_S = 2.5  # over two heartbeats
Work = dict[int, list[list[int]]]  # prompts by length


def prompt(length: int, index: int) -> list[int]:
    """The `index`-th prompt of `length` tokens: the same ids for every target, different for every index."""
    rng = random.Random(length * 1_000_003 + index)
    return [rng.randrange(*TOKEN_RANGE) for _ in range(length)]


def prompts(lengths: Sequence[int], reps: int) -> Work:
    """Per length, `reps` prompts; warm-up prompts are index -1, -2, ..."""
    return {n: [prompt(n, i) for i in range(reps)] for n in lengths}


def warmup_prompts(lengths: Sequence[int]) -> list[list[int]]:
    return [prompt(max(lengths), -1 - i) for i in range(WARMUP)]


def median_ms(seconds: Sequence[float]) -> float:
    return round(statistics.median(seconds) * 1000, 1)


def ratios(candidate: Sequence[float], baseline: Sequence[float]) -> list[float | None]:
    return [round(c / b, 3) if b > 0 else None for c, b in zip(candidate, baseline, strict=True)]  # NaN > 0 is False


# ---- the plain engine, in a process of its own ----------------------------------------------------------------


def _plain_times(
    engine: dict[str, Any], warmup: list[list[int]], work: Work, in_process: bool
) -> dict[int, list[float]]:
    """Runs in a spawned process: the served engine's arguments on core 0; each prompt's `generate` wall time."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from pdserve_tools.engine import offline_engine

    llm = offline_engine(EngineConfig(**engine), cores={0}, in_process=in_process)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    try:
        for ids in warmup:
            llm.generate([TokensPrompt(prompt_token_ids=ids)], one, use_tqdm=False)
        times: dict[int, list[float]] = {}
        for length, batch in work.items():
            for ids in batch:
                start = time.perf_counter()
                llm.generate([TokensPrompt(prompt_token_ids=ids)], one, use_tqdm=False)
                times.setdefault(length, []).append(time.perf_counter() - start)
        return times
    finally:
        llm.llm_engine.engine_core.shutdown()


def run_plain(engine: EngineConfig, work: Work, warmup: list[list[int]], in_process: bool) -> dict[str, list[float]]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        times = pool.submit(_plain_times, dataclasses.asdict(engine), warmup, work, in_process).result()
    return {"prefill_ms": [median_ms(times[n]) for n in work]}


# ---- pdserve ---------------------------------------------------------------------------------------------------


async def _settled_steps(metrics_url: str, role: str, at_least: float) -> tuple[float, float]:
    """The cumulative step (sum, count) of the instances of `role`, once the count is at least `at_least` and has
    not changed over `SETTLE_S` (the router's counters follow the instances' heartbeats, one a second)."""
    from pdserve_tools.bench.router_probe import scrape
    from pdserve_tools.bench.serve_engines import EngineCounters

    deadline = time.monotonic() + HEARTBEAT_WAIT_S
    last: tuple[float, float] | None = None
    since = time.monotonic()
    while True:
        steps = EngineCounters.parse(await scrape(metrics_url)).steps
        now = (sum(h.total_s for h in steps.values() if h.role == role),
               sum(h.count for h in steps.values() if h.role == role))
        if now != last:
            last, since = now, time.monotonic()
        elif now[1] >= at_least and time.monotonic() - since >= SETTLE_S:
            return now
        if time.monotonic() > deadline:
            raise TimeoutError(f"the {role} instances' step counters did not reach {at_least:g} and settle "
                               f"within {HEARTBEAT_WAIT_S:.0f} s (last: {now[1]:g})")
        await asyncio.sleep(0.25)  # polling the router's counters, which follow heartbeats


async def run_pdserve(name: str, base: ServeConfig, model: str | None, work: Work,
                      warmup: list[list[int]], log_dir: Path) -> dict[str, list[float]]:
    from pdserve_client import AsyncClient
    from pdserve_tools.bench.pdserve_server import pdserve_process
    from pdserve_tools.bench.serve_targets import target_data

    layout, role = PDSERVE[name]
    data = target_data(base, layout, model)
    out: dict[str, list[float]] = {"prefill_ms": [], "step_ms": [], "client_ms": []}
    log = log_dir / name / "pdserve.log"
    async with pdserve_process(data, log) as served, AsyncClient(served.grpc_target) as client:
        for ids in warmup:
            await client.complete(ids, max_tokens=1, temperature=0.0, ignore_eos=True, timeout=300)
        total, count = await _settled_steps(served.metrics_url, role, len(warmup))
        for length, batch in work.items():
            compute, wall = [], []
            for ids in batch:
                start = time.perf_counter()
                done = await client.complete(ids, max_tokens=1, temperature=0.0, ignore_eos=True, timeout=300)
                wall.append(time.perf_counter() - start)
                compute.append(done.final.timings.prefill_compute)
            now_total, now_count = await _settled_steps(served.metrics_url, role, count + len(batch))
            steps = now_count - count
            out["prefill_ms"].append(median_ms(compute))
            out["client_ms"].append(median_ms(wall))
            out["step_ms"].append(round((now_total - total) / steps * 1000, 1) if steps else float("nan"))
            total, count = now_total, now_count
            print(f"[{name}] {length:5d} tokens: prefill {out['prefill_ms'][-1]} ms, step "
                  f"{out['step_ms'][-1]} ms over {int(steps)} steps, client {out['client_ms'][-1]} ms", flush=True)
    return out


# ---- entry ---------------------------------------------------------------------------------------------------


def report(model: str, lengths: Sequence[int], reps: int, targets: dict[str, dict[str, list[float]]],
           cost_model_ms: Sequence[float] | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {"model": model, "lengths": list(lengths), "reps": reps, "targets": targets}
    if cost_model_ms is not None:
        result["cost_model_ms"] = list(cost_model_ms)
        result["cost_model_x_step"] = {name: ratios(cost_model_ms, figures["step_ms"])
                                       for name, figures in targets.items() if "step_ms" in figures}
    if "vllm" in targets:
        base = targets["vllm"]["prefill_ms"]
        result["ratio"] = {name: ratios(figures["prefill_ms"], base) for name, figures in targets.items()
                           if name != "vllm"}  # vllm-inproc included: what running in one process changes
    return result


def print_report(result: dict[str, Any]) -> None:
    targets = result["targets"]
    against = result.get("ratio", {})
    rows = []
    for i, n in enumerate(result["lengths"]):
        row: list[object] = [n]
        for figures in targets.values():
            row += [figures[key][i] for key in figures]
        row += [r[i] for r in against.values()]
        rows.append(row)
    header = ["prompt tokens", *(f"{name} {key}" for name, figures in targets.items() for key in figures)]
    print(table([*header, *(f"{name} x vllm" for name in against)], rows))


def main(args: argparse.Namespace) -> int:
    base = load_config(args.config)
    engine = dataclasses.replace(base.engine, model=args.model) if args.model else base.engine
    work = prompts(args.lengths, args.reps)
    warmup = warmup_prompts(args.lengths)
    targets: dict[str, dict[str, list[float]]] = {}
    for name in args.targets:
        print(f"[{name}] starting", flush=True)
        if name in ("vllm", "vllm-inproc"):
            targets[name] = run_plain(engine, work, warmup, in_process=name == "vllm-inproc")
        else:
            targets[name] = asyncio.run(run_pdserve(name, base, args.model, work, warmup, Path(args.logs)))
    cost = None
    if args.cost and Path(args.cost).is_file():
        from pdserve_tools.sim.cost import CostModel

        model = CostModel.from_json(Path(args.cost).read_text())
        cost = [round(model.prefill_s(n) * 1000, 1) for n in args.lengths]
    result = report(engine.model, args.lengths, args.reps, targets, cost)
    print_report(result)
    write_json(Path(args.out), result)
    print(f"wrote {args.out}")
    return 0


def add_parser(bsub: Any, func: Any) -> None:
    b = bsub.add_parser("prefill", help="one prompt's prefill in pdserve against a plain vLLM engine on the same core, "
                                        "per prompt length")
    b.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS))
    b.add_argument("--reps", type=int, default=3, help="prompts per length; the figures are their median")
    b.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    b.add_argument("--config", help="a serve config whose engine section both targets use")
    b.add_argument("--model", help="model folder or name (default: the config's)")
    b.add_argument("--cost", default="data/sim/cost-smollm2-135m-instruct-cpu.json",
                   help="the simulator's cost file to set beside the live step times (skipped when missing)")
    b.add_argument("--logs", default="bench-results/prefill-logs")
    b.add_argument("--out", default="docs/benchmarks/prefill-speed.json")
    b.set_defaults(func=func)
