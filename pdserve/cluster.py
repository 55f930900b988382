"""Cluster bring-up: Ray, the worker actors, the router and its gRPC frontend, and their orderly shutdown.

Thread pinning: instance i reserves `cpus_per_instance` Ray CPUs and its engine's OpenMP threads are bound
to cores [i*c, (i+1)*c) modulo the node's cores (`VLLM_CPU_OMP_THREADS_BIND`), with no core held back
(`VLLM_CPU_NUM_OF_RESERVED_CPU=0`). Two instances on a 2-core machine thus get one core each.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any

import grpc
import ray

from pdserve.config import EngineConfig, RayConfig, ServeConfig, WorkersConfig
from pdserve.decode.worker import DecodeWorker
from pdserve.models import resolve_model
from pdserve.router.metrics import RouterMetrics, serve_metrics
from pdserve.router.policy import make_policy
from pdserve.router.registry import Instance, Registry
from pdserve.router.service import COLOCATED, Router
from pdserve.router.tokenizer import PromptTokenizer
from pdserve.router.validation import Limits

log = logging.getLogger(__name__)


def init_ray(config: RayConfig) -> None:
    if ray.is_initialized():
        return
    if config.address is None:
        ray.init(
            num_cpus=config.num_cpus,
            namespace=config.namespace,
            include_dashboard=False,
            log_to_driver=config.log_to_driver,
        )
    else:
        ray.init(address=config.address, namespace=config.namespace, log_to_driver=config.log_to_driver)


def worker_env(index: int, workers: WorkersConfig, engine: EngineConfig, node_cpus: int) -> dict[str, str]:
    env = {
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_LOGGING_LEVEL": engine.log_level,
        # vLLM 0.32's ahead-of-time compile cache fails to load back ("'function' object has no attribute
        # 'finalize_loading'") and recompiles on every start; its older cache path reloads.
        "VLLM_USE_AOT_COMPILE": "0",
    }
    if workers.bind_threads:
        c = workers.cpus_per_instance
        cores = sorted({(index * c + k) % node_cpus for k in range(c)})
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(core) for core in cores)
    return env


async def start_workers(config: ServeConfig, model_dir: str) -> list[Instance]:
    node_cpus = os.cpu_count() or 1
    actor_cls = ray.remote(DecodeWorker)
    handles = []
    for i in range(config.workers.instances):
        instance_id = f"{COLOCATED}-{i}"
        handle = actor_cls.options(  # type: ignore[attr-defined]
            name=instance_id,
            num_cpus=config.workers.cpus_per_instance,
            runtime_env={"env_vars": worker_env(i, config.workers, config.engine, node_cpus)},
        ).remote(instance_id, config.engine, model_dir)
        handles.append((instance_id, handle))
    infos = await asyncio.gather(*(h.start.remote() for _, h in handles))
    return [Instance(iid, COLOCATED, h, info) for (iid, h), info in zip(handles, infos, strict=True)]


@dataclass
class Deployment:
    """A running pdserve: workers, router and frontend. `stop()` takes it all down."""

    router: Router
    server: grpc.aio.Server
    port: int
    metrics_server: Any  # the /metrics HTTP server
    metrics_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float = 5.0) -> None:
        await self.server.stop(grace)
        self.metrics_server.shutdown()
        instances = self.router.registry.all()
        await asyncio.gather(*(i.handle.shutdown.remote() for i in instances), return_exceptions=True)
        for i in instances:
            ray.kill(i.handle)


async def deploy(config: ServeConfig) -> Deployment:
    from pdserve.router.grpc_server import start_grpc

    model_dir = str(resolve_model(config.engine.model))
    init_ray(config.ray)
    instances = await start_workers(config, model_dir)
    tokenizer = PromptTokenizer(model_dir)
    limits = Limits(
        model_name=served_name(config.engine.model),
        max_model_len=min(i.info.max_model_len for i in instances),
        max_tokens_limit=config.router.max_tokens_limit,
        vocab_size=tokenizer.vocab_size,
    )
    metrics = RouterMetrics()
    router = Router(Registry(instances), make_policy(config.router.policy), tokenizer, limits, metrics)
    server, port = await start_grpc(router, config.router.host, config.router.port)
    metrics_server, metrics_port = serve_metrics(metrics, config.router.host, config.router.metrics_port)
    return Deployment(router, server, port, metrics_server, metrics_port)


def served_name(model: str) -> str:
    """The name clients use for the model: the built-in name, or the folder's name."""
    return os.path.basename(os.path.normpath(model))

