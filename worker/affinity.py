"""Binding a whole process (every thread it has now) to a set of cores.

`os.sched_setaffinity(0, ...)` moves only the calling thread (and threads it creates later); a process that
already runs threads (Ray's, gRPC's, vLLM's engine client) needs each of them moved.
"""

from __future__ import annotations

import contextlib
import os


def parse_cores(text: str) -> set[int]:
    """"1,3" -> {1, 3}; an empty text is no cores."""
    return {int(part) for part in text.split(",") if part.strip()}


def bind_process(cores: set[int]) -> set[int]:
    """Binds every thread of this process to `cores`, as far as the process may run there; returns the cores
    bound to (empty, and nothing changed, when none of `cores` is allowed)."""
    allowed = cores & os.sched_getaffinity(0)
    if not allowed:
        return set()
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the thread ended meanwhile, or may not move
            os.sched_setaffinity(int(tid), allowed)
    return allowed
