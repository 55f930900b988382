"""The offline engine of the tools that run the served model (calibration, labelling): one `vllm.LLM` built from a
`worker.config.EngineConfig` as `worker.engine.Engine` builds the served engine, so the tools measure and sample
the engine that serves.

Contract. `offline_engine(config, cores, in_process, prefix_caching)` starts a `vllm.LLM` with the served engine's
arguments: the model (resolved by `pdserve.models.resolve_model`, as the cluster resolves it), dtype,
max_model_len, max_num_seqs, max_num_batched_tokens, block_size, seed, KV cache bytes, eager unless
`config.compile`. Two settings are the tools' own: chunked prefill is off (every prompt is prefilled whole, in one
step: calibration times whole prefills, and vLLM-CPU fails a seeded request whose prompt is split across steps:
"CPU Generator does not use offset"), and prefix caching is `prefix_caching` (None: vLLM's default, as served).
Shut the engine down with `llm.llm_engine.engine_core.shutdown()`.

Threads, as a served instance's: no core held back (`VLLM_CPU_NUM_OF_RESERVED_CPU=0`, vLLM keeps one by default)
and, when `cores` is given, the engine's OpenMP threads on them (`VLLM_CPU_OMP_THREADS_BIND`; None leaves the
variable as the environment has it). vLLM applies that binding in the engine's own process. `in_process=True`
runs the engine in this process instead (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so that each `llm_engine.step()`
runs exactly one engine step while it lasts (an engine core in a process of its own steps ahead of its caller, and
a timed call would time a queue read); there vLLM binds no threads, so this process binds every thread it has to
`cores`, and OpenMP and torch to as many threads as cores (threads made later inherit the binding).
"""

from __future__ import annotations

import os
from typing import Any

from worker.affinity import bind_process
from worker.config import EngineConfig, engine_args


def offline_engine(config: EngineConfig, cores: set[int] | None = None, in_process: bool = False,
                   prefix_caching: bool | None = None) -> Any:
    """A started `vllm.LLM` for `config` (see the module's contract); ValueError for cores this process may not
    run on."""
    if cores is not None:
        allowed = os.sched_getaffinity(0)
        if not cores or not cores <= allowed:
            raise ValueError(f"cannot run an engine on cores {sorted(cores)}: this process may run on "
                             f"{sorted(allowed)} only")
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(core) for core in sorted(cores))
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    if in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if cores is not None:
            os.environ["OMP_NUM_THREADS"] = str(len(cores))  # read when torch loads, and by vLLM, which keeps it
    import torch
    from vllm import LLM

    from pdserve.models import resolve_model

    if in_process and cores is not None:
        bind_process(cores)
        torch.set_num_threads(len(cores))  # torch may have loaded before OMP_NUM_THREADS was set
    return LLM(
        **engine_args(config, str(resolve_model(config.model))),
        enable_chunked_prefill=False,
        enable_prefix_caching=prefix_caching,
    )
