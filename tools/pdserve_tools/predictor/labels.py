"""The labelled data set: one `LabelRecord` per prompt, stored as one JSON object per line. Pure.

Contract. A record holds the conversation key, its split, the prompt text (the first human turn, before the chat
template), its length in tokens after the chat template, and the output lengths of each sample the served model
generated, with whether each stopped at `max_tokens` (capped: the true length is at least that). The key is a
hash of the prompt text: ShareGPT repeats some first turns word for word across conversations, and keying by the
text keeps every copy of a prompt in one split (no test prompt is also a training prompt) and labels it once.

`parse_lines` reads a file's lines: a last line without its newline is the tail of an interrupted write and is
dropped; any other bad line raises ValueError naming its number. `labelling_order` is the order prompts are
labelled in: deterministic for a seed, duplicates removed, so a resumed run continues where the last one stopped.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pdserve_tools.predictor.metrics import SPLITS


@dataclass(frozen=True, slots=True)
class LabelSettings:
    """What produced a record; every record of one file must share them."""

    model: str
    temperature: float
    max_tokens: int
    samples: int


@dataclass(frozen=True, slots=True)
class LabelRecord:
    id: str
    split: str
    prompt: str
    prompt_tokens: int
    lengths: tuple[int, ...]
    capped: tuple[bool, ...]
    settings: LabelSettings

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if not self.lengths or len(self.lengths) != len(self.capped) or min(self.lengths) < 0:
            raise ValueError("a record needs one non-negative length and one capped flag per sample")
        if self.prompt_tokens < 1:
            raise ValueError("prompt_tokens must be >= 1")

    def to_json(self) -> str:
        s = self.settings
        return json.dumps(
            {"id": self.id, "split": self.split, "prompt": self.prompt, "prompt_tokens": self.prompt_tokens,
             "lengths": list(self.lengths), "capped": list(self.capped), "model": s.model,
             "temperature": s.temperature, "max_tokens": s.max_tokens, "samples": s.samples},
            ensure_ascii=False,
        )


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def from_json(line: str) -> LabelRecord:
    item = json.loads(line)
    if not isinstance(item, dict):
        raise ValueError("a record is a JSON object")
    try:
        settings = LabelSettings(str(item["model"]), float(item["temperature"]), int(item["max_tokens"]),
                                 int(item["samples"]))
        return LabelRecord(str(item["id"]), str(item["split"]), str(item["prompt"]), int(item["prompt_tokens"]),
                           tuple(int(n) for n in item["lengths"]), tuple(bool(c) for c in item["capped"]), settings)
    except (KeyError, TypeError) as err:
        raise ValueError(f"a record misses or mistypes a field ({err})") from None


def parse_lines(lines: Iterable[str], source: str = "<labels>") -> list[LabelRecord]:
    """Records of a file's lines (kept with their newlines); an unterminated bad last line is dropped."""
    out: list[LabelRecord] = []
    pending: tuple[int, str] | None = None  # a bad line, fatal unless it turns out to be the unterminated last
    for number, line in enumerate(lines, start=1):
        if pending is not None:
            raise ValueError(f"{source} line {pending[0]}: {pending[1]}")
        if not line.strip():
            continue
        try:
            out.append(from_json(line))
        except ValueError as err:  # json.JSONDecodeError is a ValueError
            if line.endswith("\n"):
                raise ValueError(f"{source} line {number}: {err}") from None
            pending = (number, str(err))
    return out


def labelling_order(prompts: Sequence[str], seed: int = 0) -> list[tuple[str, str]]:
    """(key, prompt) pairs in the order to label them: shuffled by the seed, each distinct prompt once."""
    order = list(range(len(prompts)))
    random.Random(f"predictor-label:{seed}").shuffle(order)
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for i in order:
        key = prompt_key(prompts[i])
        if key not in seen and prompts[i].strip():
            seen.add(key)
            out.append((key, prompts[i]))
    return out
