"""`pdserve predictor train`: fits the quantile head on a labelled file's train split, early-stopped on validation.

`--features minilm` (the default) fits an MLP on MiniLM embeddings, below; `--features hashed` fits a linear head
on hashed n-grams instead (`pdserve_tools.predictor.hashed_fit`). For MiniLM, every prompt's features are
computed once (the embedding dominates the time); each sample of a prompt is one training row (its features,
log(1 + its length)). A file without validation records (a toy file) early-stops on the training rows instead,
and says so.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pdserve_tools.predictor.labels import LabelRecord
from pdserve_tools.predictor.store import read_labels
from router.predictor.head import FitConfig, FitResult, HeadConfig, QuantileHead, fit, save_head


@dataclass(frozen=True, slots=True)
class Rows:
    """One row per sample: features [n, d] and log(1 + length) [n]."""

    x: torch.Tensor
    y: torch.Tensor


def rows(features: torch.Tensor, records: Sequence[LabelRecord]) -> Rows:
    """Per-prompt features [p, d] repeated for each of the prompt's samples."""
    repeats = torch.tensor([len(r.lengths) for r in records], dtype=torch.long)
    lengths = [n for r in records for n in r.lengths]
    return Rows(features.repeat_interleave(repeats, dim=0), torch.log1p(torch.tensor(lengths, dtype=torch.float32)))


def by_split(records: Sequence[LabelRecord], split: str) -> list[LabelRecord]:
    return [r for r in records if r.split == split]


def minilm_features(records: Sequence[LabelRecord]) -> torch.Tensor:
    from router.predictor.features import Embedder, prompt_features

    if not records:
        return torch.zeros(0, 385)
    return prompt_features(Embedder().embed([r.prompt for r in records]), [r.prompt_tokens for r in records])


def train_head(train: Rows, validation: Rows, head_config: HeadConfig, fit_config: FitConfig
               ) -> tuple[QuantileHead, FitResult]:
    if len(train.y) == 0:
        raise ValueError("no training records: label more prompts")
    if len(validation.y) == 0:
        print("no validation records: early stopping on the training rows", file=sys.stderr)
        validation = train
    torch.manual_seed(fit_config.seed)  # the initial weights
    head = QuantileHead(head_config)
    return head, fit(head, (train.x, train.y), (validation.x, validation.y), fit_config)


def _main_hashed(args: argparse.Namespace, records: Sequence[LabelRecord]) -> int:
    from pdserve_tools.predictor.hashed_fit import HashedFitConfig, fit_hashed

    torch.set_num_threads(1)
    train, validation = by_split(records, "train"), by_split(records, "validation")
    if not validation:
        print("no validation records: choosing on the training prompts", file=sys.stderr)
    result = fit_hashed(train, validation, HashedFitConfig(buckets=args.buckets, seed=args.seed))
    save_head(result.head, args.out, {"data": str(args.data), "train_prompts": len(train),
                                      "validation_prompts": len(validation), "penalty": result.penalty,
                                      "validation_loss": result.validation_loss, "best_step": result.best_step,
                                      "max_tokens": records[0].settings.max_tokens})
    size = Path(args.out).stat().st_size
    print(f"hashed head saved to {args.out} ({size / 1024:.0f} KiB): {len(train)} train / {len(validation)} "
          f"validation prompts, penalty {result.penalty:g}, validation censored pinball "
          f"{result.validation_loss:.4f} at step {result.best_step}", file=sys.stderr)
    return 0


def main(args: argparse.Namespace) -> int:
    records = read_labels(args.data)
    if not records:
        raise SystemExit(f"{args.data} holds no records: label some first")
    if args.features == "hashed":
        return _main_hashed(args, records)
    train, validation = by_split(records, "train"), by_split(records, "validation")
    features = minilm_features(train + validation)
    head, result = train_head(
        rows(features[: len(train)], train), rows(features[len(train):], validation),
        HeadConfig(in_dim=features.shape[1], hidden=args.hidden), FitConfig(epochs=args.epochs, seed=args.seed),
    )
    save_head(head, args.out, {"data": str(args.data), "train_prompts": len(train),
                               "validation_prompts": len(validation), "validation_loss": result.validation_loss,
                               "best_epoch": result.best_epoch, "max_tokens": records[0].settings.max_tokens})
    size = Path(args.out).stat().st_size
    print(f"head saved to {args.out} ({size / 1024:.0f} KiB): {len(train)} train / {len(validation)} validation "
          f"prompts, validation pinball {result.validation_loss:.4f} at epoch {result.best_epoch} of "
          f"{result.epochs}", file=sys.stderr)
    return 0
