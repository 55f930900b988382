"""Shared fixtures: a tiny random model made at test time, and a running pdserve deployment on local Ray."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings

T = TypeVar("T")

# CI explores the same examples on every run, so a landing never hinges on a lucky draw; locally each run
# draws new examples. Neither side times examples: this machine's load varies too much.
settings.register_profile("ci", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# Every engine in the tests binds one core and builds quickly (no torch.compile).
TINY_ENGINE = {"max_model_len": 1024, "max_num_seqs": 16, "max_num_batched_tokens": 1024, "kv_cache_gib": 0.25,
               "compile": False}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pdserve_tools.tiny_model import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", seed=0)


class LoopThread:
    """An event loop on its own thread, for servers the synchronous tests talk to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="pdserve-test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 600) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)


def start_deployment(tiny_model: Path, workers: dict[str, Any], **sections: dict[str, Any]) -> Any:
    """A pdserve deployment of the tiny model on local Ray, with its own event loop thread (`dep.loop`)."""
    from pdserve.cluster import deploy, init_ray
    from pdserve.config import config_from_dict

    config = config_from_dict(
        {
            # Ray's CPUs are logical: every engine pins its threads to one physical core of its own (instance i
            # to core i mod the core count), so several deployments can share this machine's cores.
            "ray": {"num_cpus": 16},
            "engine": {"model": str(tiny_model), **TINY_ENGINE},
            "workers": workers,
            "router": {"port": 0, "http_port": 0, "metrics_port": 0, "max_tokens_limit": 512,
                       **sections.pop("router", {})},
            **sections,
        }
    )
    # Ray ties its head processes' lives to the thread that starts them (the kernel's parent-death signal), so it
    # starts on this long-lived thread, not on the loop thread that a deployment's stop ends.
    init_ray(config.ray)
    loop = LoopThread()
    dep = loop.run(deploy(config))
    dep.loop = loop
    return dep


def stop_deployment(dep: Any) -> None:
    dep.loop.run(dep.stop())
    dep.loop.close()


@pytest.fixture(scope="session", autouse=True)
def _ray_shuts_down_cleanly() -> Iterator[None]:
    """Stops the local Ray the tests started, before the interpreter exits (left to exit hooks, its core worker
    may outlive the cluster's control store and abort the process)."""
    yield
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


@pytest.fixture(scope="session")
def deployment(tiny_model: Path) -> Iterator[Any]:
    """Two colocated instances of the tiny model behind the gRPC frontend."""
    dep = start_deployment(tiny_model, {"mode": "colocated", "colocated": {"instances": 2}})
    yield dep
    stop_deployment(dep)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll(condition: Callable[[], Any], what: str, timeout: float = 60.0, period: float = 0.2) -> Any:
    """Calls `condition` until it returns something truthy (which is returned) or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(period)  # the polling period, not a synchronization: the loop exits on the condition
