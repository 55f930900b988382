"""Workloads: arrivals (Poisson or gamma) and heavy-tailed lengths from a seed. Pure, deterministic.

Contract: `generate(config)` returns `config.requests` `SimRequest`s sorted by arrival, the same for the same
config. Lengths come from one of two sources. By default output lengths are a two-part lognormal mixture
(short chat answers and a `long_fraction` of long ones) and prompts are lognormal. With `lengths`, a table of
(prompt tokens, output tokens) pairs (e.g. ShareGPT conversations tokenized, `pdserve_tools.sim.lengths`), each
request draws one pair uniformly; prompts are capped at `max_prompt_tokens` and outputs at `max_tokens`
either way. Each request gets a `LengthPrediction` from a noisy
oracle (`prediction_sigma` is the spread of its log error), so policies can be compared at a known
prediction quality. Requests of one of `prefix_groups` groups share a system prompt of `prefix_tokens`.

With `turns` > 1 requests are the turns of multi-turn conversations: conversations start at `rate_rps / turns`
(so requests arrive at about `rate_rps`), and turn k's prompt is the conversation so far (system prompt, every
earlier user turn and answer) plus a new user turn, drawn like a single request's prompt; turn k + 1 arrives an
exponential think time of mean `think_s` after turn k (open loop: it does not wait for turn k's answer). A
conversation ends early once its next prompt would pass `max_prompt_tokens` past the system prompt. Every full
block of a turn's prompt has a prefix hash (blocks of the system prompt alone are shared by its group).
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
    turns: int = 1  # turns per conversation; 1: independent requests
    think_s: float = 10.0  # mean think time between a conversation's turns, in seconds

    def __post_init__(self) -> None:
        if self.requests < 0 or self.rate_rps <= 0 or self.arrival not in ("poisson", "gamma"):
            raise ValueError("workload needs requests >= 0, rate_rps > 0 and arrival 'poisson' or 'gamma'")
        if not 0 <= self.long_fraction <= 1 or self.max_tokens < 1:
            raise ValueError("workload needs 0 <= long_fraction <= 1 and max_tokens >= 1")
        if any(p < 1 or o < 1 for p, o in self.lengths):
            raise ValueError("every (prompt, output) pair of a length table needs both >= 1 tokens")
        if self.turns < 1 or self.think_s < 0:
            raise ValueError("workload needs turns >= 1 and think_s >= 0")


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
    if config.turns > 1:
        return _conversations(rng, config)
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


def _turn(rng: random.Random, config: WorkloadConfig) -> tuple[int, int]:
    """A user turn's tokens and its answer's, capped."""
    if config.lengths:
        own, length = config.lengths[rng.randrange(len(config.lengths))]
    else:
        median = config.long_median if rng.random() < config.long_fraction else config.output_median
        length = round(rng.lognormvariate(math.log(median), config.output_sigma))
        own = round(rng.lognormvariate(math.log(config.prompt_median), config.prompt_sigma))
    return min(max(1, own), config.max_prompt_tokens), min(config.max_tokens, max(1, length))


def _chain(group: int, conversation: int, shared: int, prompt: int) -> tuple[int, ...]:
    """Prefix hashes of a turn's full blocks: the group's for blocks within the system prompt, else the
    conversation's (its tokens only grow, so block b is the same in every turn that has it)."""
    return tuple(hash((group, b)) if (b + 1) * BLOCK_TOKENS <= shared else hash(("conversation", conversation, b))
                 for b in range(prompt // BLOCK_TOKENS))


def _conversations(rng: random.Random, config: WorkloadConfig) -> list[SimRequest]:
    turns: list[tuple[float, int, int, int, tuple[int, ...]]] = []  # arrival, prompt, output, conversation, hashes
    start = 0.0
    conversation = 0
    while len(turns) < config.requests:
        start += _gap(rng, config) * config.turns
        group = rng.randrange(config.prefix_groups) if config.prefix_groups else -1
        shared = config.prefix_tokens if group >= 0 else 0
        history, at = shared, start
        for _ in range(config.turns):
            own, length = _turn(rng, config)
            prompt = history + own
            if prompt > shared + config.max_prompt_tokens:
                break
            turns.append((at, prompt, length, conversation, _chain(group, conversation, shared, prompt)))
            history = prompt + length
            at += rng.expovariate(1.0 / config.think_s) if config.think_s > 0 else 0.0
        conversation += 1
    turns.sort(key=lambda t: (t[0], t[3]))
    return [SimRequest(rid, at, prompt, length, config.max_tokens, _predict(rng, length, config), hashes)
            for rid, (at, prompt, length, _, hashes) in enumerate(turns[:config.requests])]
