"""Fits the linear quantile head on hashed prompt features, with capped samples treated as censored.

Rows are prompts, not samples: features [p, d] once per prompt, log(1 + length) [p, s] for its s samples. The
loss is the pinball loss of the p50 and p90 over every sample, except that a sample which ran to the cap only says
"at least the cap": it charges under-prediction (quantile x shortfall) and never over-prediction. Below the cap
this is the ordinary pinball loss; above it nothing pulls a prediction down, so a prompt that always runs to the
cap may be predicted above it (the router caps every prediction at the request's `max_tokens`).

The hashed columns are left as they are (unit-norm already; standardising a rare column would magnify it); the
dense columns are standardised with the training prompts' mean and std. Full-batch Adam (sparse products) with
an L2 penalty on the weights; the penalty is chosen from `penalties` by the validation loss, each fit keeping the
weights of its best validation step.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve_tools.predictor.labels import LabelRecord
from router.predictor.hashed import DENSE, feature_matrix
from router.predictor.head import QUANTILES, HeadConfig, QuantileHead


@dataclass(frozen=True, slots=True)
class Prompts:
    """Features [p, d], log(1 + length) [p, s] and capped flags [p, s] (s: the most samples of any prompt; a
    prompt with fewer has its missing samples masked out by `weight` [p, s])."""

    x: torch.Tensor
    y: torch.Tensor
    capped: torch.Tensor
    weight: torch.Tensor


def prompts(records: Sequence[LabelRecord], buckets: int) -> Prompts:
    x = feature_matrix([r.prompt for r in records], [r.prompt_tokens for r in records], buckets)
    s = max((len(r.lengths) for r in records), default=1)
    y = torch.zeros(len(records), s)
    capped = torch.zeros(len(records), s, dtype=torch.bool)
    weight = torch.zeros(len(records), s)
    for i, r in enumerate(records):
        n = len(r.lengths)
        y[i, :n] = torch.log1p(torch.tensor(r.lengths, dtype=torch.float32))
        capped[i, :n] = torch.tensor(r.capped)
        weight[i, :n] = 1.0
    return Prompts(x, y, capped, weight)


def censored_pinball(predicted: torch.Tensor, data: Prompts) -> torch.Tensor:
    """Mean over samples of the pinball loss of predicted [p, 2] (the QUANTILES); a capped sample charges only
    under-prediction."""
    q = torch.tensor(QUANTILES, dtype=predicted.dtype)
    diff = data.y.unsqueeze(-1) - predicted.unsqueeze(1)  # [p, s, 2]: positive where predicted too low
    loss = torch.where(data.capped.unsqueeze(-1), q * diff.clamp(min=0), torch.maximum(q * diff, (q - 1) * diff))
    return (loss * data.weight.unsqueeze(-1)).sum() / (2 * data.weight.sum())


@dataclass(frozen=True, slots=True)
class HashedFitConfig:
    buckets: int = 16384
    penalties: tuple[float, ...] = (0.01, 0.03, 0.1)
    lr: float = 0.02
    steps: int = 1500
    patience: int = 150  # steps without a better validation loss
    seed: int = 0


@dataclass(frozen=True, slots=True)
class HashedFit:
    head: QuantileHead
    penalty: float
    validation_loss: float
    best_step: int


def _outputs(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    """`QuantileHead.forward` on standardised sparse features x [p, d]: [p, 2] log lengths at the p50 and p90."""
    out = torch.sparse.mm(x, linear.weight.t()) + linear.bias
    return torch.cat([out[:, :1], out[:, :1] + torch.nn.functional.softplus(out[:, 1:])], dim=-1)


def _fit_one(train: Prompts, validation: Prompts, penalty: float, config: HashedFitConfig) -> HashedFit:
    torch.manual_seed(config.seed)
    head = QuantileHead(HeadConfig(in_dim=train.x.shape[1], hidden=0, dropout=0.0, features="hashed",
                                   buckets=config.buckets))
    linear = head.body
    assert isinstance(linear, torch.nn.Linear)
    dense = slice(config.buckets, config.buckets + len(DENSE))
    with torch.no_grad():
        linear.weight.zero_()  # start from the unconditional quantiles
        head.mean[dense] = train.x[:, dense].mean(0)
        head.std[dense] = train.x[:, dense].std(0).clamp(min=1e-6) if len(train.x) > 1 else 1.0
        head.start_at(train.y[train.weight > 0])
    # The rows are mostly zeros: a sparse product makes a step cost milliseconds, not a dense [p, d] pass.
    x_train, x_held = (((d.x - head.mean) / head.std).to_sparse() for d in (train, validation))
    optimizer = torch.optim.Adam(linear.parameters(), lr=config.lr)
    best, best_step, best_state = float("inf"), 0, copy.deepcopy(head.state_dict())
    for step in range(1, config.steps + 1):
        optimizer.zero_grad()
        loss = censored_pinball(_outputs(x_train, linear), train) + penalty * linear.weight.square().sum()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            held = float(censored_pinball(_outputs(x_held, linear), validation))
        if held < best:
            best, best_step, best_state = held, step, copy.deepcopy(head.state_dict())
        elif step - best_step >= config.patience:
            break
    head.load_state_dict(best_state)
    return HashedFit(head.eval(), penalty, best, best_step)


def fit_hashed(train: Sequence[LabelRecord], validation: Sequence[LabelRecord], config: HashedFitConfig) -> HashedFit:
    """The best of one fit per penalty, by validation loss (the training prompts stand in for a missing
    validation split)."""
    if not train:
        raise ValueError("no training records: label more prompts")
    train_data = prompts(train, config.buckets)
    held = prompts(validation, config.buckets) if validation else train_data
    fits = [_fit_one(train_data, held, penalty, config) for penalty in config.penalties]
    return min(fits, key=lambda f: f.validation_loss)
