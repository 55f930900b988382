"""Where a worker's threads run: its engine on its own core, everything else of the actor off every engine's core.

One colocated instance on this machine: its engine is bound to core 0, and the actor's own threads (request
channel, engine client, Ray's) go to the cores left over. With no core left over they are not bound at all.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import ray

from pdserve_client import Client
from tests.conftest import start_deployment, stop_deployment
from worker.binding import bind_node

pytestmark = pytest.mark.integration

WORKERS = {"mode": "colocated", "colocated": {"instances": 1}}


def thread_cores(pid: int) -> dict[int, set[int]]:
    cores = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
            cores[int(tid)] = os.sched_getaffinity(int(tid))
    return cores


def test_the_actors_own_threads_stay_off_its_engines_core(tiny_model: Path) -> None:
    dep = start_deployment(tiny_model, WORKERS)
    try:
        with Client(dep.target) as client:  # a served request: every thread the actor needs has started
            assert client.complete([11, 12, 13], max_tokens=4, temperature=0.0).token_ids
        instance = dep.router.registry.all()[0]
        pid = ray.get(instance.handle.pid.remote())
        node = os.cpu_count() or 1
        spare = set(bind_node([1], node)[0].spare_cores) or os.sched_getaffinity(0)
        threads = thread_cores(pid)
        assert len(threads) > 10  # Ray's, gRPC's and the engine client's threads
        assert all(cores == spare for cores in threads.values()), threads
        if node > 1:
            assert 0 not in spare  # the engine's core
    finally:
        stop_deployment(dep)
