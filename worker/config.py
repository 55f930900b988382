"""`EngineConfig`: one vLLM engine's arguments, as every worker builds its engine."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EngineConfig:
    """One vLLM engine. `model` is a model folder path or the name of a model `pdserve model prepare` makes."""

    model: str = DEFAULT_MODEL
    max_model_len: int = 2048
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    kv_cache_gib: float = 1.0
    dtype: str = "float32"
    block_size: int = 128
    seed: int = 0
    # torch.compile the model. On a 2-core AVX2 machine it did not speed up SmolLM2's decode steps (about
    # 100 ms either way) while a first start compiled for about 4 minutes, so it is off by default.
    compile: bool = False
    log_level: str = "WARNING"  # vLLM's own logging inside the workers

    def __post_init__(self) -> None:
        if self.max_model_len < 16:
            raise ValueError(f"engine.max_model_len must be >= 16, got {self.max_model_len}")
        if self.max_num_seqs < 1:
            raise ValueError(f"engine.max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"engine.max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"engine.max_model_len ({self.max_model_len})"
            )
        if self.kv_cache_gib <= 0:
            raise ValueError(f"engine.kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"engine.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
