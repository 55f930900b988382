"""Workloads: arrivals (Poisson or gamma) and heavy-tailed lengths from a seed. Pure, deterministic.

Contract: `generate(config)` returns `config.requests` `SimRequest`s sorted by arrival, the same for the same
config. Lengths come from one of two sources. By default output lengths are a two-part lognormal mixture
(short chat answers and a `long_fraction` of long ones) and prompts are lognormal. With `lengths`, a table of
(prompt tokens, output tokens) pairs (e.g. ShareGPT conversations tokenized, `pdserve_tools.sim.lengths`), each
request draws one pair uniformly; prompts are capped at `max_prompt_tokens` and outputs at `max_tokens`
either way. Each request gets a `LengthPrediction` from a noisy
oracle (`prediction_sigma` is the spread of its log error), so policies can be compared at a known
prediction quality. Requests of one of `prefix_groups` groups share a system prompt of `prefix_tokens`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from router.predictor.prediction import LengthPrediction

BLOCK_TOKENS = 16


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    requests: int = 2_000
    rate_rps: float = 50.0
    arrival: str = "poisson"  # or "gamma"
    gamma_cv: float = 2.0  # coefficient of variation of gamma inter-arrival times (> 1: bursty)
    prompt_median: int = 256
    prompt_sigma: float = 1.0
    max_prompt_tokens: int = 8192
    output_median: int = 64
    long_fraction: float = 0.2
    long_median: int = 700
    output_sigma: float = 0.6
    max_tokens: int = 2048
    prediction_sigma: float = 0.3
    prefix_groups: int = 8
    prefix_tokens: int = 128
    lengths: tuple[tuple[int, int], ...] = ()  # (prompt, output) pairs to draw from; empty: the lognormals
    lengths_name: str = "lognormal"  # where `lengths` came from, for reports
    seed: int = 0

    def __post_init__(self) -> None:
        if self.requests < 0 or self.rate_rps <= 0 or self.arrival not in ("poisson", "gamma"):
            raise ValueError("workload needs requests >= 0, rate_rps > 0 and arrival 'poisson' or 'gamma'")
        if not 0 <= self.long_fraction <= 1 or self.max_tokens < 1:
            raise ValueError("workload needs 0 <= long_fraction <= 1 and max_tokens >= 1")
        if any(p < 1 or o < 1 for p, o in self.lengths):
            raise ValueError("every (prompt, output) pair of a length table needs both >= 1 tokens")


@dataclass(slots=True)
class SimRequest:
    rid: int
    arrival: float
    prompt_tokens: int
    output_tokens: int  # what it will really generate, first token included (>= 1)
    max_tokens: int
    prediction: LengthPrediction
    prefix_hashes: tuple[int, ...]


def _gap(rng: random.Random, config: WorkloadConfig) -> float:
    mean = 1.0 / config.rate_rps
    if config.arrival == "poisson":
        return rng.expovariate(config.rate_rps)
    shape = 1.0 / (config.gamma_cv * config.gamma_cv)
    return rng.gammavariate(shape, mean / shape)


def _predict(rng: random.Random, true_len: int, config: WorkloadConfig) -> LengthPrediction:
    p50 = max(1, round(true_len * math.exp(rng.gauss(0.0, config.prediction_sigma))))
    p90 = max(p50, round(p50 * math.exp(1.2816 * config.prediction_sigma)))
    return LengthPrediction(p50, p90).capped(config.max_tokens)


def generate(config: WorkloadConfig) -> list[SimRequest]:
    rng = random.Random(config.seed)
    out: list[SimRequest] = []
    now = 0.0
    for rid in range(config.requests):
        now += _gap(rng, config)
        if config.lengths:
            own, length = config.lengths[rng.randrange(len(config.lengths))]
            group = rng.randrange(config.prefix_groups) if config.prefix_groups else -1
        else:  # the draws in this order, so a seed gives the workload it always gave
            median = config.long_median if rng.random() < config.long_fraction else config.output_median
            length = round(rng.lognormvariate(math.log(median), config.output_sigma))
            group = rng.randrange(config.prefix_groups) if config.prefix_groups else -1
            own = round(rng.lognormvariate(math.log(config.prompt_median), config.prompt_sigma))
        length = min(config.max_tokens, max(1, length))
        own = min(max(1, own), config.max_prompt_tokens)
        shared = config.prefix_tokens if group >= 0 else 0
        hashes = tuple(hash((group, b)) for b in range(shared // BLOCK_TOKENS))
        pred = _predict(rng, length, config)
        out.append(SimRequest(rid, now, shared + own, length, config.max_tokens, pred, hashes))
    return out
