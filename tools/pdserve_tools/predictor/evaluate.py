"""`pdserve predictor eval`: scores trained heads on the held-out split beside a prompt-length-only baseline.

The baseline is linear quantile regression on log(1 + prompt tokens), fitted here on the same file's train split
with the same loss and early stopping. Both are scored by `metrics.score` on the chosen split (default: test),
with the raw p90 and with the p90 calibrated online (the split's samples replayed in file order through a fresh
`P90Calibrator`, each request predicted before it is observed, as the router would). The cost per request is the
median wall time of one `predict_text` call (features and head, one prompt at a time, after warm-up), over up
to `--cost-prompts` prompts. Beside them, the labels' own noise on the split (`metrics.split_half_tau`). Prints
a table; writes the numbers as JSON, and with `--summary` the first head's headline figures (`tau`,
`cost_ms_p50`, raw `p90_coverage`, `within_100`) with the same under `baseline` for the prompt-length head.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pdserve_tools.predictor.labels import LabelRecord
from pdserve_tools.predictor.metrics import score, split_half_tau
from pdserve_tools.predictor.refine import remaining_given
from pdserve_tools.predictor.refine_eval import GRID, EmpiricalRemaining, Estimator, score_remaining
from pdserve_tools.predictor.store import read_labels
from pdserve_tools.predictor.train import by_split, rows, train_head
from pdserve_tools.stats import percentile
from router.predictor.calibration import P90Calibrator
from router.predictor.features import length_feature
from router.predictor.head import FitConfig, HeadConfig, load_head, to_tokens
from router.predictor.learned import LearnedLengthPredictor
from router.predictor.prediction import LengthPrediction, remaining


def _replay_coverage(p90_raw: Sequence[float], records: Sequence[LabelRecord]) -> float:
    calibrator = P90Calibrator()
    hits = total = 0
    for raw, record in zip(p90_raw, records, strict=True):
        for n in record.lengths:
            issued = min(round(calibrator.apply(raw)), record.settings.max_tokens)
            hits += n <= issued
            total += 1
            calibrator.observe(issued, n)
    return hits / total


def _cost_ms(predictor: LearnedLengthPredictor, records: Sequence[LabelRecord], count: int) -> dict[str, float]:
    sample = list(records[:count])
    for r in sample[:3]:
        predictor.predict_text(r.prompt, r.prompt_tokens, r.settings.max_tokens)  # warm-up
    times = []
    for r in sample:
        start = time.perf_counter()
        predictor.predict_text(r.prompt, r.prompt_tokens, r.settings.max_tokens)
        times.append((time.perf_counter() - start) * 1000)
    return {"cost_ms_p50": percentile(times, 50), "cost_ms_max": max(times)}


def predictions(predictor: LearnedLengthPredictor, records: Sequence[LabelRecord]) -> list[LengthPrediction]:
    """Raw (uncalibrated) quantiles per record, capped at the record's max_tokens."""
    out = predictor.raw([r.prompt for r in records], [r.prompt_tokens for r in records])  # [n, 2]
    p50 = [to_tokens(float(v), r.settings.max_tokens) for v, r in zip(out[:, 0], records, strict=True)]
    p90 = [max(to_tokens(float(v), r.settings.max_tokens), a) for v, r, a in zip(out[:, 1], records, p50, strict=True)]
    return [LengthPrediction(a, b) for a, b in zip(p50, p90, strict=True)]


def evaluate(predictor: LearnedLengthPredictor, records: Sequence[LabelRecord], cost_prompts: int) -> dict[str, Any]:
    out = predictor.raw([r.prompt for r in records], [r.prompt_tokens for r in records])  # [n, 2]
    issued = predictions(predictor, records)
    p50, p90 = [p.p50 for p in issued], [p.p90 for p in issued]
    scores = score(p50, p90, [r.lengths for r in records])
    p90_raw = [math.expm1(float(v)) for v in out[:, 1]]
    return {**asdict(scores), "p90_coverage_online": _replay_coverage(p90_raw, records),
            **_cost_ms(predictor, records, cost_prompts)}


def _baseline(records: Sequence[LabelRecord]) -> LearnedLengthPredictor:
    train, validation = by_split(records, "train"), by_split(records, "validation")

    def length_rows(rs: Sequence[LabelRecord]) -> Any:
        return rows(length_feature([r.prompt_tokens for r in rs]), rs)

    head, _ = train_head(length_rows(train), length_rows(validation),
                         HeadConfig(in_dim=1, hidden=0, dropout=0.0, features="length"), FitConfig(lr=1e-2))
    return LearnedLengthPredictor(head)


ROWS = [("kendall_tau", "Kendall tau (p50 vs median)", "{:.3f}"), ("mae_tokens", "MAE, tokens", "{:.1f}"),
        ("within_50", "within +-50 tokens", "{:.3f}"), ("within_100", "within +-100 tokens", "{:.3f}"),
        ("p90_coverage", "p90 coverage (raw)", "{:.3f}"), ("p90_coverage_online", "p90 coverage (online)", "{:.3f}"),
        ("cost_ms_p50", "cost per request, ms p50", "{:.2f}"), ("cost_ms_max", "cost per request, ms max", "{:.2f}")]


def table(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    lines = [f"{'':30}" + "".join(f"{n:>16}" for n in names)]
    for key, label, fmt in ROWS:
        lines.append(f"{label:30}" + "".join(f"{fmt.format(results[n][key]):>16}" for n in names))
    return "\n".join(lines)


def _finite(value: Any) -> Any:
    """NaN (a tau over constant predictions) becomes null: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def remaining_report(predictor: LearnedLengthPredictor, train: Sequence[LabelRecord],
                     held_out: Sequence[LabelRecord]) -> dict[str, Any]:
    """The remaining-length estimators scored on the held-out split, given the head's raw predictions."""
    issued = predictions(predictor, held_out)
    estimators: dict[str, Estimator] = {
        "remaining": remaining, "conditional": remaining_given,
        "empirical_train": EmpiricalRemaining(predictions(predictor, train), train),
    }
    out: dict[str, Any] = {}
    for name, estimator in estimators.items():
        overall, per_g = score_remaining(estimator, issued, held_out)
        out[name] = {**asdict(overall), "per_g": {str(g): asdict(v) for g, v in per_g.items()}}
    return out


def remaining_table(report: dict[str, Any]) -> str:
    lines = [f"{'remaining after g tokens':28}" + "".join(f"{n:>16}" for n in report)]
    for key, fmt in (("pinball_p50", "{:.1f}"), ("pinball_p90", "{:.1f}"), ("p90_coverage", "{:.3f}"),
                     ("within_100", "{:.3f}")):
        lines.append(f"{key:28}" + "".join(f"{fmt.format(report[n][key]):>16}" for n in report))
    for g in GRID:
        lines.append(f"{'  g=' + str(g) + ' pinball p50/p90':28}" + "".join(
            f"{report[n]['per_g'][str(g)]['pinball_p50']:>8.1f}{report[n]['per_g'][str(g)]['pinball_p90']:>8.1f}"
            for n in report))
    return "\n".join(lines)


NAMES = {"hashed": "hashed", "minilm+length": "minilm", "length": "length_head"}
SUMMARY = ("kendall_tau", "cost_ms_p50", "p90_coverage", "within_100")


def summary(chosen: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """The headline figures: tau, cost, raw p90 coverage and within +-100 tokens, and the same for the baseline."""

    def pick(result: dict[str, Any]) -> dict[str, Any]:
        return {("tau" if key == "kendall_tau" else key): result[key] for key in SUMMARY}

    return {**pick(chosen), "baseline": pick(baseline)}


def main(args: argparse.Namespace) -> int:
    records = read_labels(args.data)
    held_out = by_split(records, args.split)
    if not held_out:
        raise SystemExit(f"{args.data} holds no {args.split} records")
    torch.set_num_threads(args.threads)
    results: dict[str, dict[str, Any]] = {}
    for path in args.head:
        head = load_head(path)
        name = NAMES.get(head.config.features, head.config.features)
        if name in results:
            name = f"{name}:{Path(path).stem}"
        results[name] = {"head": str(path), **evaluate(LearnedLengthPredictor(head), held_out, args.cost_prompts)}
    results["prompt_length"] = evaluate(_baseline(records), held_out, args.cost_prompts)
    print(f"{len(held_out)} {args.split} prompts, {sum(len(r.lengths) for r in held_out)} samples "
          f"({args.data}, {args.threads} torch thread(s))")
    print(table(results))
    noise = split_half_tau([r.lengths for r in held_out])
    print(f"label noise: Kendall tau of one half of each prompt's samples against the other half {noise:.3f} "
          "(a ceiling on the tau these labels can show)")
    first = next(iter(results))
    refined = remaining_report(LearnedLengthPredictor(load_head(args.head[0])), by_split(records, "train"), held_out)
    print(f"the remaining output of running requests ({first}'s raw predictions, {refined['remaining']['cases']} "
          f"cases: a sample still running after g of {list(GRID)} tokens)")
    print(remaining_table(refined))
    report = {"data": str(args.data), "heads": list(args.head), "split": args.split, "threads": args.threads,
              "results": results, "label_noise_tau": noise, "remaining": refined}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(_finite(report), indent=2, allow_nan=False) + "\n")
    if args.summary:
        figures = {"model": first, "split": args.split, "prompts": len(held_out),
                   **summary(results[first], results["prompt_length"]), "label_noise_tau": noise}
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(_finite(figures), indent=2, allow_nan=False) + "\n")
    return 0
