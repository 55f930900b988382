"""A tiny random model for tests, benchmarks and chaos runs: 2 layers, head_dim 64 (vLLM's CPU attention rejects
smaller heads), SmolLM2's tokenizer, fixed seed. Made on the machine in seconds; nothing is downloaded."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pdserve.models import DONE, publish, smollm2_tokenizer


def make_tiny_llama(target: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer; deterministic for a given seed."""
    if (target / DONE).exists():
        return target
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        # Wide initial weights make a random model emit varied tokens with clear margins between the top
        # two logits, so exactness tests compare real sequences rather than one repeated token.
        initializer_range=1.0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)  # type: ignore[arg-type]
    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    model.save_pretrained(build)
    tokenizer.save_pretrained(build)
    return publish(build, target)
