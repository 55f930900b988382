"""How long an engine's processes busy-wait for each other: a vLLM plugin.

On CPU, vLLM runs every engine as an engine-core process and a worker process that pass each step over
shared-memory queues. A reader of such a queue spins (`sched_yield`) for vLLM's `busy_loop_s`, 1 s, after each
message before it sleeps on a notification, which the writer sends with every message. So while a worker
computes a step, its engine core spins on some core; a pdserve engine core is not bound to a core (only the
worker's OpenMP threads are), and on a machine whose cores each run an engine it spins on another engine's core.

The notification is best effort: the writer's socket drops it silently when the one before is still in flight
(vLLM's PUB socket keeps one message). vLLM covers that by having a sleeping reader look at the queue again every
`SHM_READER_RECHECK_INTERVAL_MS`, 5 s, so a dropped notification stalls the reader that long. With a spin of 1 s
that path is taken only after a second of silence; with a short spin it is taken at every step, and a decode
engine with no spin lost several 5 s stalls per request (TPOT 88 to 1,247 ms against 62 to 71 ms with vLLM's
spin, one request of 48 tokens at a time). So wherever pdserve sets the spin, a sleeping reader also looks again
every `RECHECK_MS`: a dropped notification then costs that long at most, and each sleeping reader wakes
1000 / `RECHECK_MS` times a second for nothing, a few microseconds each.

`engine.busy_wait_s` sets the spin for pdserve's engines: the cluster passes it in the environment
(`BUSY_WAIT_ENV`) of every worker actor, whose engine processes inherit it, and vLLM calls `install` in each of
them (entry point group `vllm.general_plugins`) before it builds the queues. Without the variable (plain vLLM
in this environment), nothing changes.
"""

from __future__ import annotations

import functools
import os
from typing import Any

BUSY_WAIT_ENV = "PDSERVE_ENGINE_BUSY_WAIT_S"
RECHECK_MS = 5  # how often a sleeping reader looks at its queue again (see the module docstring)


def install() -> None:
    """Sets the queues' busy-wait to the environment's `BUSY_WAIT_ENV` seconds, and their sleeping readers'
    recheck to `RECHECK_MS`, when the variable is set."""
    value = os.environ.get(BUSY_WAIT_ENV)
    if not value:
        return
    seconds = float(value)
    from vllm.distributed.device_communicators import shm_broadcast
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS = RECHECK_MS  # read at every wait

    original = getattr(SpinCondition.__init__, "__wrapped__", SpinCondition.__init__)

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if self.is_reader:
            self.busy_loop_s = seconds

    SpinCondition.__init__ = init  # type: ignore[method-assign]
