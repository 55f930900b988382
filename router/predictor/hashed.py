"""Hashed prompt features: word uni- and bi-grams hashed into a fixed number of buckets, plus a few dense
features of the prompt's shape. Pure; about 0.2 ms for a short prompt, under 2 ms for any.

Contract. `sparse_features(text, prompt_tokens, buckets)` returns the non-zero (column, value) pairs of a vector
of `buckets + len(DENSE)` columns:

- columns [0, buckets): the lower-cased text split into words and punctuation marks (of a longer text, the first
  and the last `MAX_WORDS` / 2, which bounds the cost), every word and every pair of adjacent words hashed with
  crc32 (stable across processes and machines, unlike Python's salted `hash`). The hash picks the column and
  one of its bits the sign, so collisions cancel in expectation. Each distinct n-gram counts once, and this part
  is scaled to unit L2 norm: a long prompt weighs no more for having more words (its length has columns of its
  own).
- columns buckets + i, for the i-th name in `DENSE`: log(1 + prompt tokens), log(1 + words), log(1 + lines),
  whether the text holds code (a fence, a line ending in a brace or semicolon, or a keyword such as `def `),
  whether it ends with a question mark.

`feature_matrix` stacks the vectors of several prompts as a dense float32 tensor [n, buckets + len(DENSE)].
"""

from __future__ import annotations

import itertools
import math
import re
import zlib
from collections.abc import Sequence

import torch

DENSE = ("log_prompt_tokens", "log_words", "log_lines", "has_code", "ends_with_question")
MAX_WORDS = 512
_MAX_CHARS = 16 * MAX_WORDS  # of a longer text, only the ends are split into words
_WORD = re.compile(r"\w+|[^\w\s]")
_CODE = ("```", "{\n", "}\n", ";\n", "def ", "function ", "class ", "import ", "#include")


def words(text: str) -> list[str]:
    """The lower-cased words and punctuation marks of the text; of a longer one, the first and last MAX_WORDS / 2."""
    half = MAX_WORDS // 2
    if len(text) > _MAX_CHARS:
        ws = _WORD.findall(text[: _MAX_CHARS // 2].lower())[:half]
        return ws + _WORD.findall(text[-(_MAX_CHARS // 2):].lower())[-half:]
    ws = _WORD.findall(text.lower())
    return ws if len(ws) <= MAX_WORDS else ws[:half] + ws[-half:]


def _hashed(grams: set[str], buckets: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for gram in grams:
        h = zlib.crc32(gram.encode("utf-8"))
        column = h % buckets
        out[column] = out.get(column, 0.0) + (1.0 if h & 0x80000000 else -1.0)
    norm = math.sqrt(sum(v * v for v in out.values()))
    return {c: v / norm for c, v in out.items() if v != 0.0} if norm > 0 else {}


def sparse_features(text: str, prompt_tokens: int, buckets: int) -> list[tuple[int, float]]:
    """The non-zero (column, value) pairs of one prompt's vector of `buckets + len(DENSE)` columns."""
    if buckets < 1:
        raise ValueError(f"hashed features need at least one bucket, got {buckets}")
    ws = words(text)
    grams = {"u " + w for w in ws}
    grams.update("b " + a + " " + b for a, b in itertools.pairwise(ws))
    ends = text if len(text) <= _MAX_CHARS else text[: _MAX_CHARS // 2] + "\n" + text[-(_MAX_CHARS // 2):]
    dense = (math.log1p(prompt_tokens), math.log1p(len(ws)), math.log1p(text.count("\n")),
             float(any(mark in ends for mark in _CODE)), float(ends.rstrip().endswith("?")))
    out = sorted(_hashed(grams, buckets).items())
    out.extend((buckets + i, v) for i, v in enumerate(dense) if v != 0.0)
    return out


def feature_matrix(texts: Sequence[str], prompt_tokens: Sequence[int], buckets: int) -> torch.Tensor:
    """[len(texts), buckets + len(DENSE)] float32: each prompt's `sparse_features`, dense."""
    if len(texts) != len(prompt_tokens):
        raise ValueError("feature_matrix needs one token count per text")
    x = torch.zeros(len(texts), buckets + len(DENSE))
    for row, (text, n) in enumerate(zip(texts, prompt_tokens, strict=True)):
        pairs = sparse_features(text, n, buckets)
        if pairs:
            columns, values = zip(*pairs, strict=True)
            x[row, list(columns)] = torch.tensor(values)
    return x
