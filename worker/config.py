"""`EngineConfig`: one vLLM engine's settings, and `engine_args`: the vLLM arguments every engine is built with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EngineConfig:
    """One vLLM engine. `model` is a model folder path or the name of a model `pdserve model prepare` makes."""

    model: str = DEFAULT_MODEL  # a model folder, or the built-in SmolLM2-135M-Instruct
    max_model_len: int = 2048  # prompt plus output tokens of one request
    max_num_seqs: int = 32  # requests one engine step runs at most
    max_num_batched_tokens: int = 2048  # tokens one engine step computes at most
    kv_cache_gib: float = 1.0  # KV cache of one engine
    dtype: str = "float32"  # float32, bfloat16 or float16 (float32 is faster on AVX2 CPUs)
    block_size: int = 128  # tokens per KV block
    seed: int = 0  # the engine's sampling seed
    # torch.compile the model. On a 2-core AVX2 machine it did not speed up SmolLM2's decode steps (about
    # 100 ms either way) while a first start compiled for about 4 minutes, so it is off by default.
    compile: bool = False  # torch.compile the model (see above)
    log_level: str = "WARNING"  # vLLM's own logging inside the workers
    # How long an engine's processes spin on their shared-memory queues after each message before they sleep on a
    # notification (`worker/busy_wait.py`). vLLM's own is 1 s: the engine core, bound to no core, spins while its
    # worker computes, on another engine's core. 0 took pdserve 1P1D's prefill from a mean 1.07x a plain vLLM
    # engine's time to 0.96x on 2 cores (docs/benchmarks/prefill-speed.md); each wait costs a wake-up instead.
    busy_wait_s: float = 0.0  # spin time of the engine's processes after each message (see above)

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
        if not self.busy_wait_s >= 0:
            raise ValueError(f"engine.busy_wait_s must be >= 0 seconds, got {self.busy_wait_s}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"engine.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


def engine_args(config: EngineConfig, model_dir: str) -> dict[str, Any]:
    """The vLLM engine arguments every pdserve engine shares (served or offline), as keyword arguments of
    `AsyncEngineArgs` / `LLM`."""
    return {
        "model": model_dir,
        "dtype": config.dtype,
        "max_model_len": config.max_model_len,
        "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "block_size": config.block_size,
        "seed": config.seed,
        "enforce_eager": not config.compile,
        "kv_cache_memory_bytes": int(config.kv_cache_gib * 2**30),
    }
