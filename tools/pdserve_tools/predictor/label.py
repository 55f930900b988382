"""`pdserve predictor label`: output lengths of the served model over ShareGPT prompts, resumable.

The served model runs offline in one `vllm.LLM` with the served engine's settings (`pdserve_tools.engine`;
continuous batching: `--batch` prompts in the engine at once, every prompt sampled `--samples` times with vLLM's
`n`, a finished prompt replaced by the next at once).
Each prompt is the first human turn of a ShareGPT conversation with the chat template applied, as the router
applies it to a chat request. Sampling is the served default, temperature 1.0
and top_p 1.0 (what a request that names no temperature gets), so the labels describe the lengths the router
will see; each prompt's seed derives from its key, so a prompt's samples do not depend on its batch. Outputs stop
at `--max-tokens` (512 by default) and the record says which samples were capped there.

Prompts are taken in `labels.labelling_order`, skipping those whose templated length exceeds
`--max-prompt-tokens`, until the file holds `--prompts` records. Records are appended and synced as each prompt
finishes; a rerun with the same file skips the keys it holds (and repairs a last line cut by an interruption), so
`--prompts` is the size the file grows to, not a count to add. A file labelled with other settings is refused.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve_tools.engine import offline_engine
from pdserve_tools.predictor.labels import LabelRecord, LabelSettings, labelling_order
from pdserve_tools.predictor.metrics import split_of
from pdserve_tools.predictor.store import LabelWriter, read_labels, repair_tail
from worker.config import EngineConfig

SERVED_TEMPERATURE = 1.0


@dataclass(frozen=True, slots=True)
class LabelConfig:
    model: str
    out: Path
    prompts: int = 2000
    samples: int = 4
    batch: int = 32
    temperature: float = SERVED_TEMPERATURE
    max_tokens: int = 512
    max_prompt_tokens: int = 1024
    kv_cache_gib: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prompts < 0 or self.samples < 1 or self.batch < 1 or self.max_tokens < 1:
            raise ValueError("labelling needs --prompts >= 0, --samples >= 1, --batch >= 1 and --max-tokens >= 1")
        if self.temperature < 0 or self.max_prompt_tokens < 1 or not self.kv_cache_gib > 0:
            raise ValueError("labelling needs temperature >= 0, max_prompt_tokens >= 1 and kv_cache_gib > 0")

    @property
    def engine(self) -> EngineConfig:
        """The served engine's arguments for `model`, sized for `batch` prompts of `samples` samples each."""
        longest = self.max_prompt_tokens + self.max_tokens
        return EngineConfig(model=self.model, max_model_len=longest, max_num_seqs=self.batch * self.samples,
                            max_num_batched_tokens=max(8192, longest), kv_cache_gib=self.kv_cache_gib,
                            seed=self.seed)

    @property
    def settings(self) -> LabelSettings:
        return LabelSettings(Path(self.model).name, self.temperature, self.max_tokens, self.samples)


def _pending(config: LabelConfig, tokenizer: Any, done: set[str]) -> Iterator[tuple[str, str, list[int]]]:
    """(key, prompt, templated token ids) of prompts not yet labelled, in labelling order."""
    from pdserve_tools.bench.workload import load_sharegpt

    for key, prompt in labelling_order([c.prompt for c in load_sharegpt().conversations], config.seed):
        if key in done:
            continue
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        if len(ids) <= config.max_prompt_tokens:
            yield key, prompt, ids


def _params(config: LabelConfig, key: str) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(n=config.samples, temperature=config.temperature, max_tokens=config.max_tokens,
                          seed=(int(key[:8], 16) + config.seed) % 2**31, detokenize=False,
                          output_kind=RequestOutputKind.FINAL_ONLY)


def _label_stream(llm: Any, config: LabelConfig, items: Iterator[tuple[str, str, list[int]]],
                  limit: int) -> Iterator[LabelRecord]:
    """Labels up to `limit` of `items`, yielding each prompt's record as soon as all its samples finished.

    Continuous batching: `config.batch` prompts are in the engine at any time, a finished one replaced by the next
    at once, so the batch never drains down to its longest sample as it would with one engine call per batch."""
    core = llm.llm_engine
    in_flight: dict[str, tuple[str, str, list[int]]] = {}
    taken = 0

    def top_up() -> None:
        nonlocal taken
        while len(in_flight) < config.batch and taken < limit:
            item = next(items, None)
            if item is None:
                return
            key, _, ids = item
            core.add_request(key, {"prompt_token_ids": ids}, _params(config, key))
            in_flight[key] = item  # outputs carry the id given here (the engine's own id adds a suffix)
            taken += 1

    top_up()
    while in_flight:
        for out in core.step():
            if not out.finished:
                continue
            key, prompt, ids = in_flight.pop(out.request_id)
            samples = sorted(out.outputs, key=lambda o: o.index)
            yield LabelRecord(
                id=key, split=split_of(key), prompt=prompt, prompt_tokens=len(ids),
                lengths=tuple(len(o.token_ids) for o in samples),
                capped=tuple(o.finish_reason == "length" for o in samples),
                settings=config.settings,
            )
        top_up()


def remaining(config: LabelConfig) -> int:
    """Prompts still to label into `config.out` (after repairing an interrupted last line); refuses a file
    labelled with other settings."""
    repair_tail(config.out)
    existing = read_labels(config.out)
    other = next((r.settings for r in existing if r.settings != config.settings), None)
    if other is not None:
        raise ValueError(f"{config.out} was labelled with {other}, not {config.settings}: use another --out")
    return max(config.prompts - len(existing), 0)


def engine(config: LabelConfig) -> Any:
    """The served model in one offline engine (`pdserve_tools.engine.offline_engine`, every prompt prefilled whole)
    on the cores the environment binds it to; shut it down with `llm.llm_engine.engine_core.shutdown()`."""
    return offline_engine(config.engine)


def label(config: LabelConfig, llm: Any) -> int:
    """Grows `config.out` to `config.prompts` records with `llm`; returns the number this call wrote."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    todo = remaining(config)
    if todo == 0:
        return 0
    existing = read_labels(config.out)
    # The router's tokenizer: the model folder's own, as `PromptTokenizer` loads it.
    tokenizer = AutoTokenizer.from_pretrained(llm.llm_engine.model_config.tokenizer)
    written = 0
    with LabelWriter(config.out) as writer, tqdm(total=config.prompts, initial=len(existing), unit="prompt",
                                                  desc="labelling") as bar:
        for record in _label_stream(llm, config, _pending(config, tokenizer, {r.id for r in existing}), todo):
            writer.write([record])
            written += 1
            bar.update(1)
    return written


def _exit_on_sigterm() -> None:
    """SIGTERM ends a run as Ctrl-C does, through the `finally` that shuts the engine down: left to the default
    action, the engine's processes outlive the labeller and keep both cores busy."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def main(args: argparse.Namespace) -> int:
    config = LabelConfig(model=args.model, out=Path(args.out), prompts=args.prompts, samples=args.samples,
                         batch=args.batch, temperature=args.temperature, max_tokens=args.max_tokens,
                         max_prompt_tokens=args.max_prompt_tokens, kv_cache_gib=args.kv_cache_gib, seed=args.seed)
    written = 0
    if remaining(config) > 0:
        _exit_on_sigterm()
        llm = engine(config)
        try:
            written = label(config, llm)
        finally:
            llm.llm_engine.engine_core.shutdown()
    total = len(read_labels(config.out))
    print(f"{written} prompts labelled by this run; {config.out} holds {total}", file=sys.stderr)
    return 0
