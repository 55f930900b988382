"""How long an engine's processes busy-wait for each other: a vLLM plugin.

On CPU, vLLM runs every engine as an engine-core process and a worker process that pass each step over
shared-memory queues. A reader of such a queue spins (`sched_yield`) for vLLM's `busy_loop_s`, 1 s, after each
message before it sleeps on a notification, which the writer sends with every message. So while a worker
computes a step, its engine core spins on some core; a pdserve engine core is not bound to a core (only the
worker's OpenMP threads are), and on a machine whose cores each run an engine it spins on another engine's core.

`engine.busy_wait_s` sets that time for pdserve's engines: the cluster passes it in the environment
(`BUSY_WAIT_ENV`) of every worker actor, whose engine processes inherit it, and vLLM calls `install` in each of
them (entry point group `vllm.general_plugins`) before it builds the queues. Without the variable (plain vLLM
in this environment), nothing changes.
"""

from __future__ import annotations

import functools
import os
from typing import Any

BUSY_WAIT_ENV = "PDSERVE_ENGINE_BUSY_WAIT_S"


def install() -> None:
    """Sets the queues' busy-wait to the environment's `BUSY_WAIT_ENV` seconds, when it is set."""
    value = os.environ.get(BUSY_WAIT_ENV)
    if not value:
        return
    seconds = float(value)
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    original = getattr(SpinCondition.__init__, "__wrapped__", SpinCondition.__init__)

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if self.is_reader:
            self.busy_loop_s = seconds

    SpinCondition.__init__ = init  # type: ignore[method-assign]
