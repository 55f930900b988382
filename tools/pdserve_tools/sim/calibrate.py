"""`pdserve calibrate`: the simulator's `CostModel` fitted to step times measured on one vLLM engine on CPU.

The shell around `fit`. The served model runs offline in this process (`pdserve_tools.engine.offline_engine`,
`in_process`), so that each `llm_engine.step()` call runs exactly one engine step while it lasts. The engine has
the served engine's settings (`CalibrateConfig.engine`: an `EngineConfig` with its defaults, fp32, eager, its block
size) sized for the batches asked for; the process and its OpenMP threads are bound to `--cores` (one core by
default, as each served instance gets). No prefix caching and no chunked prefill (every prompt is prefilled whole,
in one step); prompts are distinct random token ids, so nothing could hit a cache anyway. A short warm-up runs
unrecorded.

- Prefill: for each of `--prefill-tokens`, `--repeats` requests of that many tokens, one in the engine at a
  time, `max_tokens=1`; the engine time of the steps that run it (one: the prompt and its first token). Repeats
  go round the lengths, so a change in the machine's load touches every length alike.
- Decode: for each batch size in `--batches` and context in `--contexts` (prompt tokens per sequence), that many
  requests stepped through their prefill, then `--decode-steps` pure decode steps timed one by one, each with
  the batch and the KV tokens its sequences hold (prompt plus tokens so far, the step's input token included).
  A step that does not advance every sequence (a preemption) fails the run: give it more `--kv-cache-gib`.

A point is the median of its repeats (prefill) or steps (decode); `fit` fits the cost model's linear forms to
the points with non-negative least squares. Transfer: this engine's KV bytes per token (its KV cache bytes over
the tokens they hold) at `--transfer-gb-s`, by default the KV bandwidth `pdserve bench transfer` measured for real
requests with layer-wise streaming on these machines (README, "KV transfer"); the simulator charges it in full
after each prefill, which layer-wise streaming mostly hides. `kv_capacity_tokens` is this engine's KV capacity,
which `--kv-cache-gib` sets (`pdserve sim` uses its own unless asked: `--cost-kv`).

Writes JSON to `--out` (default `data/sim/cost-<model name>-cpu.json`): the `"cost"` object `CostModel.from_json`
reads, each fit (terms, coefficients, dropped terms, R^2), every measured time, the model, cores, thread count,
vLLM version and date. A progress bar goes to stderr, a table of measured against fitted times to stdout.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pdserve_tools.engine import offline_engine
from pdserve_tools.sim.fit import (
    DecodePoint,
    Fit,
    PrefillPoint,
    cost_model,
    decode_row,
    fit_decode,
    fit_prefill,
    prefill_row,
)
from pdserve_tools.stats import percentile
from worker.affinity import parse_cores
from worker.config import EngineConfig

DEFAULT_MODEL = "smollm2-135m-instruct"  # the labeller's default: the project's small real model
TRANSFER_GB_S = 2.92  # README "KV transfer": KV of real requests, layer-wise (the default), `pdserve bench transfer`
TRANSFER_SOURCE = ("README, KV transfer: `pdserve bench transfer --prompt-tokens 1024 --requests 8`, KV of real "
                   "requests with layer-wise streaming over the tcp transport, 1P1D on one 2-core CPU machine")


@dataclass(frozen=True, slots=True)
class CalibrateConfig:
    model: str = DEFAULT_MODEL
    out: Path | None = None  # None: data/sim/cost-<model name>-cpu.json
    prefill_tokens: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048)
    repeats: int = 5
    batches: tuple[int, ...] = (1, 4, 16, 64)
    contexts: tuple[int, ...] = (128, 512, 1024)  # prompt tokens per sequence of a decode batch
    decode_steps: int = 8
    cores: str = "0"  # the cores the engine runs on: "0" or "0,1"; one, as a served instance gets
    kv_cache_gib: float = 4.0
    transfer_gb_s: float = TRANSFER_GB_S
    seed: int = 0

    def __post_init__(self) -> None:
        if any(len(set(v)) != len(v) for v in (self.prefill_tokens, self.batches, self.contexts)):
            raise ValueError("--prefill-tokens, --batches and --contexts must not repeat a value")
        if len(self.prefill_tokens) < 3 or min(self.prefill_tokens) < 1:
            raise ValueError("--prefill-tokens needs at least 3 lengths, each >= 1 (three terms to fit)")
        if len(self.batches) < 2 or len(self.contexts) < 2 or min(self.batches + self.contexts) < 1:
            raise ValueError("--batches and --contexts need at least 2 values each, all >= 1 "
                             "(else batch and context cannot be told apart)")
        if self.repeats < 1 or self.decode_steps < 1:
            raise ValueError("--repeats and --decode-steps must be >= 1")
        if not (self.kv_cache_gib > 0 and self.transfer_gb_s > 0):
            raise ValueError("--kv-cache-gib and --transfer-gb-s must be > 0")
        try:
            named = parse_cores(self.cores)
        except ValueError:
            named = set()
        if not named:
            raise ValueError(f"--cores takes core numbers separated by commas (0 or 0,1), not {self.cores!r}")

    @property
    def path(self) -> Path:
        return self.out or Path("data/sim") / f"cost-{Path(self.model).name}-cpu.json"

    @property
    def max_tokens(self) -> int:
        """Per decode request: its timed steps, plus room for tokens decoded while later prompts prefill."""
        return self.decode_steps + 1 + max(self.batches)

    @property
    def max_model_len(self) -> int:
        return max(max(self.prefill_tokens) + 1, max(self.contexts) + self.max_tokens)

    @property
    def engine(self) -> EngineConfig:
        """The served engine's arguments for `model`, sized to hold the largest decode batch in one step."""
        batch = max(self.batches)
        return EngineConfig(model=self.model, max_model_len=self.max_model_len, max_num_seqs=batch,
                            max_num_batched_tokens=max(self.max_model_len, min(8192, batch * self.max_model_len)),
                            kv_cache_gib=self.kv_cache_gib, seed=self.seed)

    def kv_tokens_needed(self, block_tokens: int) -> int:
        """KV tokens the largest decode batch may take, in whole blocks of `block_tokens`."""
        blocks = -(-(max(self.contexts) + self.max_tokens) // block_tokens)
        return max(max(self.batches) * blocks * block_tokens, self.max_model_len)


@dataclass(slots=True)
class Measured:
    prefill: dict[int, list[float]] = field(default_factory=dict)  # prompt tokens -> seconds of each repeat
    decode: dict[tuple[int, int], list[tuple[int, float]]] = field(default_factory=dict)  # (batch, context)
    # -> (KV tokens held, seconds) of each timed step

    def prefill_points(self) -> list[PrefillPoint]:
        return [PrefillPoint(n, percentile(s, 50)) for n, s in self.prefill.items()]

    def decode_points(self) -> list[DecodePoint]:
        return [DecodePoint(b, round(percentile([c for c, _ in steps], 50)), percentile([s for _, s in steps], 50))
                for (b, _), steps in self.decode.items()]


def _params(max_tokens: int) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False,
                          output_kind=RequestOutputKind.DELTA)


def _timed_step(core: Any) -> tuple[list[Any], float]:
    start = time.perf_counter()
    outputs = core.step()
    return outputs, time.perf_counter() - start


def prefill_seconds(llm: Any, rid: str, ids: list[int]) -> float:
    """Engine time of one request alone in the engine, from its arrival to its one output token."""
    core = llm.llm_engine
    if core.has_unfinished_requests():
        raise RuntimeError("prefill is measured on an idle engine")
    core.add_request(rid, {"prompt_token_ids": ids}, _params(1))
    spent = 0.0
    while core.has_unfinished_requests():
        spent += _timed_step(core)[1]
    return spent


def decode_seconds(llm: Any, tag: str, prompts: list[list[int]], steps: int,
                   max_tokens: int) -> list[tuple[int, float]]:
    """(KV tokens held, seconds) of `steps` pure decode steps of all `prompts` together, after their prefill."""
    core = llm.llm_engine
    held = {f"{tag}-{i}": len(ids) for i, ids in enumerate(prompts)}  # KV tokens per sequence, input token included
    for (rid, _), ids in zip(held.items(), prompts, strict=True):
        core.add_request(rid, {"prompt_token_ids": ids}, _params(max_tokens))
    started: set[str] = set()
    while len(started) < len(held):  # prefill steps (later ones may decode the sequences prefilled earlier)
        if not core.has_unfinished_requests():
            raise RuntimeError(f"the engine ended {len(held) - len(started)} decode requests before their prefill")
        for out in core.step():
            held[out.request_id] += len(out.outputs[0].token_ids)
            started.add(out.request_id)
    timed = []
    for _ in range(steps):
        context = sum(held.values())
        outputs, seconds = _timed_step(core)
        if len(outputs) != len(held) or any(len(o.outputs[0].token_ids) != 1 for o in outputs):
            raise RuntimeError(f"a decode step of {len(held)} sequences advanced {len(outputs)}: the KV cache "
                               "is too small for this batch (raise --kv-cache-gib or lower --batches/--contexts)")
        for out in outputs:
            held[out.request_id] += 1
        timed.append((context, seconds))
    core.abort_request(list(held))
    while core.has_unfinished_requests():
        core.step()
    return timed


def _prompts(llm: Any, seed: int) -> Callable[[int], list[int]]:
    """Random prompts of a given length, distinct from one another (nothing a cache could share)."""
    rng = random.Random(seed)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    return lambda n: [rng.randrange(vocab) for _ in range(n)]


def warm_up(config: CalibrateConfig, llm: Any) -> None:
    """The first steps of an engine, and of each new shape, run slower: one prefill each of the shortest and
    longest prompts and two steps of the largest batch, unrecorded."""
    prompt = _prompts(llm, config.seed + 1)
    for n in (min(config.prefill_tokens), max(config.prefill_tokens)):
        prefill_seconds(llm, f"warm-prefill-{n}", prompt(n))
    decode_seconds(llm, "warm-decode", [prompt(min(config.contexts)) for _ in range(max(config.batches))], 2,
                   config.max_tokens)


def measure(config: CalibrateConfig, llm: Any, tick: Callable[[], None]) -> Measured:
    """Every point of `config` on `llm`; `tick` after each prefill repeat and each decode batch."""
    prompt = _prompts(llm, config.seed)
    measured = Measured()
    for r in range(config.repeats):
        for n in config.prefill_tokens:
            measured.prefill.setdefault(n, []).append(prefill_seconds(llm, f"prefill-{n}-{r}", prompt(n)))
            tick()
    for b in config.batches:
        for c in config.contexts:
            measured.decode[(b, c)] = decode_seconds(llm, f"decode-{b}-{c}", [prompt(c) for _ in range(b)],
                                                     config.decode_steps, config.max_tokens)
            tick()
    return measured


def _kv(llm: Any, config: CalibrateConfig) -> tuple[int, float]:
    """The engine's KV capacity in tokens and its KV bytes per token; refuses one too small for the batches."""
    cache = llm.llm_engine.vllm_config.cache_config
    capacity = int(cache.num_gpu_blocks) * int(cache.block_size)
    needed = config.kv_tokens_needed(int(cache.block_size))
    if capacity < needed:
        raise ValueError(f"the KV cache holds {capacity} tokens, the largest decode batch needs {needed}: "
                         "raise --kv-cache-gib or lower --batches/--contexts")
    return capacity, config.kv_cache_gib * 2**30 / capacity


def _fit_json(fit: Fit) -> dict[str, Any]:
    return {"terms": list(fit.terms), "coefficients": list(fit.coefficients), "dropped": list(fit.dropped),
            "r2": fit.r2}


def document(config: CalibrateConfig, llm: Any, measured: Measured) -> dict[str, Any]:
    """What `pdserve calibrate` writes: the fitted `"cost"` object, the fits and every measured time."""
    import torch
    import vllm

    capacity, bytes_per_token = _kv(llm, config)
    prefill, decode = fit_prefill(measured.prefill_points()), fit_decode(measured.decode_points())
    cost = cost_model(prefill, decode, bytes_per_token / (config.transfer_gb_s * 1e9), capacity)
    settings = {k: v for k, v in asdict(config).items() if k not in ("model", "out")}
    return {
        "model": Path(config.model).name,
        "device": "cpu",
        "cores": config.cores,
        "threads": torch.get_num_threads(),
        "vllm": vllm.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": settings,
        "cost": asdict(cost),
        "fit": {"prefill": _fit_json(prefill), "decode": _fit_json(decode)},
        "transfer": {"kv_bytes_per_token": bytes_per_token, "gb_per_s": config.transfer_gb_s,
                     "source": TRANSFER_SOURCE},
        "kv": {"capacity_tokens": capacity, "cache_gib": config.kv_cache_gib},
        "prefill_points": [{"tokens": n, "seconds": percentile(s, 50), "repeats_s": s}
                           for n, s in measured.prefill.items()],
        "decode_points": [{"batch": b, "context_per_seq": c, "context_tokens": p.context_tokens,
                           "seconds": p.seconds, "steps": [{"context_tokens": k, "seconds": s} for k, s in steps]}
                          for ((b, c), steps), p in zip(measured.decode.items(), measured.decode_points(),
                                                        strict=True)],
    }


def table(doc: dict[str, Any]) -> str:
    """Measured (median) against fitted times, in milliseconds, with each fit's R^2."""
    prefill, decode = (Fit(tuple(f["terms"]), tuple(f["coefficients"]), tuple(f["dropped"]), f["r2"])
                       for f in (doc["fit"]["prefill"], doc["fit"]["decode"]))
    lines = [f"prefill (R^2 {prefill.r2:.3f})", f"{'tokens':>8}{'measured':>12}{'fitted':>12}{'ratio':>8}"]
    for p in doc["prefill_points"]:
        fitted = prefill.predict(prefill_row(p["tokens"]))
        lines.append(f"{p['tokens']:>8}{p['seconds'] * 1e3:>10.2f}ms{fitted * 1e3:>10.2f}ms{_ratio(p, fitted):>8}")
    lines += ["", f"decode step (R^2 {decode.r2:.3f})",
              f"{'batch':>6}{'ctx/seq':>9}{'kv tokens':>11}{'measured':>12}{'fitted':>12}{'ratio':>8}"]
    for p in doc["decode_points"]:
        fitted = decode.predict(decode_row(p["batch"], p["context_tokens"]))
        lines.append(f"{p['batch']:>6}{p['context_per_seq']:>9}{p['context_tokens']:>11}{p['seconds'] * 1e3:>10.2f}ms"
                     f"{fitted * 1e3:>10.2f}ms{_ratio(p, fitted):>8}")
    dropped = [f"{phase} {t}" for phase, f in (("prefill", prefill), ("decode", decode)) for t in f.dropped]
    if dropped:
        lines += ["", "fixed at 0 (their free fit came out negative): " + ", ".join(dropped)]
    return "\n".join(lines)


def _ratio(point: dict[str, Any], fitted: float) -> str:
    return f"{fitted / point['seconds']:.2f}" if point["seconds"] > 0 else "-"


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = CalibrateConfig()
    p.add_argument("--model", default=d.model, help="model name or folder")
    p.add_argument("--out", help="the JSON file to write (default: data/sim/cost-<model name>-cpu.json)")
    p.add_argument("--prefill-tokens", type=int, nargs="+", default=d.prefill_tokens, help="prompt lengths")
    p.add_argument("--repeats", type=int, default=d.repeats, help="requests per prompt length")
    p.add_argument("--batches", type=int, nargs="+", default=d.batches, help="decode batch sizes")
    p.add_argument("--contexts", type=int, nargs="+", default=d.contexts, help="prompt tokens per decode sequence")
    p.add_argument("--decode-steps", type=int, default=d.decode_steps, help="timed decode steps per batch")
    p.add_argument("--cores", default=d.cores, help="cores the engine runs on, e.g. 0 or 0,1 (default: one core, "
                   "as each served instance gets)")
    p.add_argument("--kv-cache-gib", type=float, default=d.kv_cache_gib, help="room for the largest decode batch")
    p.add_argument("--transfer-gb-s", type=float, default=d.transfer_gb_s,
                   help="KV transfer bandwidth between instances (default: measured here, see the README)")
    p.add_argument("--seed", type=int, default=d.seed)


def main(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    config = CalibrateConfig(
        model=args.model, out=Path(args.out) if args.out else None,
        prefill_tokens=tuple(args.prefill_tokens), repeats=args.repeats, batches=tuple(args.batches),
        contexts=tuple(args.contexts), decode_steps=args.decode_steps,
        cores=args.cores, kv_cache_gib=args.kv_cache_gib, transfer_gb_s=args.transfer_gb_s, seed=args.seed)
    llm = offline_engine(config.engine, parse_cores(config.cores), in_process=True, prefix_caching=False)
    try:
        _kv(llm, config)  # a KV cache too small fails now, not after the prefill points
        warm_up(config, llm)
        total = len(config.prefill_tokens) * config.repeats + len(config.batches) * len(config.contexts)
        with tqdm(total=total, desc="calibrating", unit="point", file=sys.stderr) as bar:
            measured = measure(config, llm, bar.update)
        doc = document(config, llm, measured)
    finally:
        llm.llm_engine.engine_core.shutdown()
    config.path.parent.mkdir(parents=True, exist_ok=True)
    config.path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{doc['model']} on {doc['threads']} thread(s), cores {config.cores}")
    print(table(doc))
    print(f"wrote {config.path} (use it with `pdserve sim --cost {config.path}`)")
    return 0
