"""The quantile head: features in, log(1 + output length) at the p50 and p90 out; its file; its loss; its fit.

Shapes: features [n, d] are standardised with the training set's mean and std (kept in the head's file), then
an MLP (or, with `hidden=0`, one linear layer: the prompt-length baseline) gives [n, 2]. The p90 is the p50 plus
a softplus, so p50 <= p90 holds by construction. Training minimises the pinball loss of both quantiles over every
sample of every training prompt (so the head learns each prompt's length distribution, not its mean), with Adam,
and keeps the weights of the epoch with the lowest validation loss, stopping after `patience` epochs without one.
The file is a small `torch.save` dict: weights, normalisation, shape and the quantiles. Its config's `features`
names the kind of predictor it is: "minilm+length" (an MLP on a MiniLM embedding), "length" (the prompt-length
baseline) or "hashed" (a linear head on `router.predictor.hashed` features, fitted by `pdserve predictor train
--features hashed`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

QUANTILES = (0.5, 0.9)


@dataclass(frozen=True, slots=True)
class HeadConfig:
    in_dim: int
    hidden: int = 64  # 0: a linear head
    dropout: float = 0.1
    features: str = "minilm+length"  # the file's kind: which features it reads; or "length", or "hashed"
    buckets: int = 0  # "hashed": the hashed n-gram columns (see `router.predictor.hashed`)


class QuantileHead(nn.Module):
    mean: torch.Tensor  # [in_dim] buffers: the training features' normalisation
    std: torch.Tensor

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        if config.hidden > 0:
            self.body: nn.Module = nn.Sequential(
                nn.Linear(config.in_dim, config.hidden), nn.GELU(), nn.Dropout(config.dropout),
                nn.Linear(config.hidden, 2),
            )
        else:
            self.body = nn.Linear(config.in_dim, 2)
        self.register_buffer("mean", torch.zeros(config.in_dim))
        self.register_buffer("std", torch.ones(config.in_dim))

    @torch.no_grad()
    def start_at(self, y: torch.Tensor) -> None:
        """Sets the output biases to the targets' own p50 and p90, so training starts from the unconditional
        quantiles instead of spending its first epochs walking there from zero."""
        q50, q90 = (float(v) for v in torch.quantile(y, torch.tensor(QUANTILES)))
        last = self.body[-1] if isinstance(self.body, nn.Sequential) else self.body
        assert isinstance(last, nn.Linear)
        last.bias.copy_(torch.tensor([q50, math.log(math.expm1(max(q90 - q50, 1e-3)))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[n, in_dim] raw features -> [n, 2] log(1 + length) at the p50 and the p90."""
        out = self.body((x - self.mean) / self.std)
        p50 = out[:, :1]
        return torch.cat([p50, p50 + nn.functional.softplus(out[:, 1:])], dim=-1)


def pinball_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean pinball loss of predicted [n, 2] (the QUANTILES) against target [n]."""
    q = torch.tensor(QUANTILES, dtype=predicted.dtype)
    diff = target.unsqueeze(-1) - predicted  # [n, 2]
    return torch.maximum(q * diff, (q - 1) * diff).mean()


@dataclass(frozen=True, slots=True)
class FitConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 300
    patience: int = 20
    batch: int = 256
    seed: int = 0


@dataclass(frozen=True, slots=True)
class FitResult:
    validation_loss: float
    best_epoch: int
    epochs: int


def fit(head: QuantileHead, train: tuple[torch.Tensor, torch.Tensor], validation: tuple[torch.Tensor, torch.Tensor],
        config: FitConfig) -> FitResult:
    """Trains `head` in place on (features [n, d], log lengths [n]); leaves it with its best validation weights."""
    x, y = train
    head.mean.copy_(x.mean(0))
    head.std.copy_(x.std(0).clamp(min=1e-6) if len(x) > 1 else torch.ones(x.shape[1]))
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # dropout
    head.start_at(y)
    optimizer = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best, best_epoch, best_state = float("inf"), 0, copy.deepcopy(head.state_dict())
    epoch = 0
    for epoch in range(1, config.epochs + 1):
        head.train()
        for idx in torch.randperm(len(x), generator=generator).split(config.batch):
            optimizer.zero_grad()
            pinball_loss(head(x[idx]), y[idx]).backward()
            optimizer.step()
        head.eval()
        with torch.no_grad():
            loss = float(pinball_loss(head(validation[0]), validation[1]))
        if loss < best:
            best, best_epoch, best_state = loss, epoch, copy.deepcopy(head.state_dict())
        elif epoch - best_epoch >= config.patience:
            break
    head.load_state_dict(best_state)
    head.eval()
    return FitResult(best, best_epoch, epoch)


def save_head(head: QuantileHead, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": asdict(head.config), "state": head.state_dict(), "quantiles": QUANTILES,
                "extra": extra or {}}, path)


def load_head(path: str | Path) -> QuantileHead:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    head = QuantileHead(HeadConfig(**saved["config"]))
    head.load_state_dict(saved["state"])
    return head.eval()


def to_tokens(log_length: float, max_tokens: int) -> int:
    """A predicted log(1 + length) back to a whole number of tokens in [0, max_tokens]."""
    return min(max(round(math.expm1(log_length)), 0), max_tokens)
