"""Where a worker's threads run: its engine on its own core, everything else of the actor off every engine's core.

One colocated instance on this machine: its engine is bound to core 0, and the actor's own threads (request
channel, engine client, Ray's) go to the cores left over. With no core left over they are not bound at all. The
engine's own processes (vLLM's engine core and worker) get `engine.busy_wait_s` in their environment, where
pdserve's vLLM plugin reads it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import ray

from pdserve_client import Client
from tests.conftest import TINY_ENGINE, start_deployment, stop_deployment
from worker.binding import bind_node
from worker.busy_wait import BUSY_WAIT_ENV

pytestmark = pytest.mark.integration

WORKERS = {"mode": "colocated", "colocated": {"instances": 1}}


def thread_cores(pid: int) -> dict[int, set[int]]:
    cores = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
            cores[int(tid)] = os.sched_getaffinity(int(tid))
    return cores


@pytest.fixture(scope="module")
def actor_pid(tiny_model: Path) -> Iterator[int]:
    """The one worker actor's process id, once it has served a request (every thread it needs has started)."""
    dep = start_deployment(tiny_model, WORKERS, engine={"model": str(tiny_model), **TINY_ENGINE, "busy_wait_s": 0.25})
    try:
        with Client(dep.target) as client:
            assert client.complete([11, 12, 13], max_tokens=4, temperature=0.0).token_ids
        yield ray.get(dep.router.registry.all()[0].handle.pid.remote())
    finally:
        stop_deployment(dep)


def test_the_actors_own_threads_stay_off_its_engines_core(actor_pid: int) -> None:
    node = os.cpu_count() or 1
    spare = set(bind_node([1], node)[0].spare_cores) or os.sched_getaffinity(0)
    threads = thread_cores(actor_pid)
    assert len(threads) > 10  # Ray's, gRPC's and the engine client's threads
    assert all(cores == spare for cores in threads.values()), threads
    if node > 1:
        assert 0 not in spare  # the engine's core


def test_the_engines_processes_get_the_configured_busy_wait(actor_pid: int) -> None:
    engine = psutil.Process(actor_pid).children(recursive=True)  # vLLM's engine core and its worker
    assert {p.name() for p in engine} >= {"VLLM::EngineCore", "VLLM::Worker"}, engine
    assert all(p.environ().get(BUSY_WAIT_ENV) == "0.25" for p in engine)
