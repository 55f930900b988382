"""Arguments of `pdserve predictor label | train | eval`; the commands themselves load lazily."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

Command = Callable[[argparse.Namespace], int]


def add_parsers(sub: Any, label: Command, train: Command, evaluate: Command) -> None:
    p = sub.add_parser("predictor", help="the output-length predictor: label, train, eval")
    psub = p.add_subparsers(dest="predictor_command", required=True)

    c = psub.add_parser("label", help="output lengths of the served model over ShareGPT prompts (resumable)")
    c.add_argument("--model", default="smollm2-135m-instruct", help="model name or folder")
    c.add_argument("--prompts", type=int, default=2000, help="records the file grows to")
    c.add_argument("--samples", type=int, default=4, help="samples per prompt")
    c.add_argument("--out", default="data/predictor/labels.jsonl")
    c.add_argument("--batch", type=int, default=32, help="prompts in the engine at once")
    c.add_argument("--temperature", type=float, default=1.0, help="the served default")
    c.add_argument("--max-tokens", type=int, default=512)
    c.add_argument("--max-prompt-tokens", type=int, default=1024)
    c.add_argument("--kv-cache-gib", type=float, default=4.0, help="room for --batch x --samples sequences")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=label)

    c = psub.add_parser("train", help="fit the quantile head on a labelled file")
    c.add_argument("--data", required=True)
    c.add_argument("--out", required=True, help="the head file to write")
    c.add_argument("--features", choices=["minilm", "hashed"], default="minilm",
                   help="minilm: an MLP on a sentence embedding; hashed: a linear head on hashed word n-grams")
    c.add_argument("--hidden", type=int, default=64, help="minilm: hidden width; 0: linear")
    c.add_argument("--buckets", type=int, default=16384, help="hashed: n-gram buckets")
    c.add_argument("--epochs", type=int, default=300, help="at most; early stopping usually ends sooner")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=train)

    c = psub.add_parser("eval", help="score heads on the held-out split beside a prompt-length baseline")
    c.add_argument("--data", required=True)
    c.add_argument("--head", required=True, action="append",
                   help="a head file; repeat to compare several (the first is the one --summary reports)")
    c.add_argument("--summary", help="also write the first head's and the baseline's headline figures here")
    c.add_argument("--split", default="test", choices=["train", "validation", "test"])
    c.add_argument("--json", default="bench-results/predictor-eval.json")
    c.add_argument("--threads", type=int, default=1, help="torch threads (the router's share of a core)")
    c.add_argument("--cost-prompts", type=int, default=50)
    c.set_defaults(func=evaluate)
