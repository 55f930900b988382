"""Shared fixtures: a tiny random model made at test time, and a running pdserve deployment on local Ray."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Iterator
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
    from pdserve.models import make_tiny_llama

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


@pytest.fixture(scope="session")
def deployment(tiny_model: Path) -> Iterator[Any]:
    """Two colocated instances of the tiny model behind the gRPC frontend."""
    import ray

    from pdserve.cluster import deploy
    from pdserve.config import config_from_dict

    config = config_from_dict(
        {
            "ray": {"num_cpus": os.cpu_count() or 2},
            "engine": {"model": str(tiny_model), **TINY_ENGINE},
            "workers": {"instances": 2},
            "router": {"port": 0, "metrics_port": 0, "max_tokens_limit": 512},
        }
    )
    loop = LoopThread()
    dep = loop.run(deploy(config))
    dep.loop = loop
    yield dep
    loop.run(dep.stop())
    loop.close()
    ray.shutdown()
