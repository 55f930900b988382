"""Cluster bring-up: Ray, the worker actors, the router and its gRPC frontend, and their orderly shutdown.

Thread pinning: instance i reserves `cpus_per_instance` Ray CPUs and its engine's OpenMP threads are bound
to cores [i*c, (i+1)*c) modulo the node's cores (`VLLM_CPU_OMP_THREADS_BIND`), with no core held back
(`VLLM_CPU_NUM_OF_RESERVED_CPU=0`). Two instances on a 2-core machine thus get one core each. Cores left
over (one instance on two cores, say) take the actors' own threads (`PDSERVE_ACTOR_CPUS`, bound by the actor
once its engine runs); with no core left over those float.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

import grpc
import ray

from common.roles import Role
from decode.worker import DecodeWorker, consumer_role
from kv_transfer.transport import SECRET_ENV
from pdserve.config import RayConfig, ServeConfig, WorkersConfig
from pdserve.models import resolve_model
from pdserve.supervisor import Supervisor, supervise
from prefill.worker import PrefillWorker, producer_role
from router.admission import Gate
from router.channel import WorkerChannel
from router.metrics import RouterMetrics, serve_metrics
from router.policy import make_policy
from router.predictor.prediction import TextPredictor
from router.receive_budget import ReceiveBudget
from router.registry import Instance, Registry
from router.service import Handoff, Router
from router.tokenizer import PromptTokenizer
from router.validation import Limits
from worker.affinity import ACTOR_CPUS_ENV
from worker.config import EngineConfig
from worker.engine import KVRole
from worker.host import EngineHost

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
        # Ray starts worker processes at nice 15; an engine there loses its core to any nice-0 process (the
        # router, Ray's own agents) and its steps slow down. Engines run at normal priority.
        "RAY_worker_niceness": "0",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_LOGGING_LEVEL": engine.log_level,
        # vLLM 0.32's ahead-of-time compile cache fails to load back ("'function' object has no attribute
        # 'finalize_loading'") and recompiles on every start; its older cache path reloads.
        "VLLM_USE_AOT_COMPILE": "0",
    }
    if workers.bind_threads:
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(core) for core in workers.engine_cores(index, node_cpus))
        spare = workers.spare_cores(node_cpus)
        if spare:  # the actor's own threads stay off every engine's core (bound once its engine runs)
            env[ACTOR_CPUS_ENV] = ",".join(str(core) for core in spare)
    return env


def cluster_secret() -> str:
    """The KV links' shared secret: from the environment when the operator set one, else fresh for this run."""
    return os.environ.get(SECRET_ENV) or secrets.token_hex(32)


async def start_workers(config: ServeConfig, model_dir: str, secret: str) -> list[Instance]:
    node_cpus = os.cpu_count() or 1
    workers = config.workers
    run = time.time_ns() // 1_000_000  # names this deployment's actors apart from a stopped one's
    plan: list[tuple[str, Role, type[EngineHost], KVRole | None]]
    if workers.mode == Role.COLOCATED:
        plan = [(f"{Role.COLOCATED}-{i}", Role.COLOCATED, DecodeWorker, None) for i in range(workers.instances)]
    else:
        t = config.transfer
        plan = [(f"{Role.PREFILL}-{i}", Role.PREFILL, PrefillWorker, producer_role(f"{Role.PREFILL}-{i}", t))
                for i in range(workers.prefill_instances)]
        plan += [(f"{Role.DECODE}-{i}", Role.DECODE, DecodeWorker, consumer_role(f"{Role.DECODE}-{i}", t))
                 for i in range(workers.decode_instances)]
    handles: list[tuple[str, Role, Any]] = []
    for index, (instance_id, role, cls, kv) in enumerate(plan):
        env = worker_env(index, workers, config.engine, node_cpus)
        env[SECRET_ENV] = secret  # KV links and request channels accept only holders of the secret
        handle = ray.remote(cls).options(  # type: ignore[attr-defined]
            name=f"{instance_id}@{run}",  # unique per deployment: a stopped deployment's names may linger
            num_cpus=workers.cpus_per_instance,
            max_restarts=-1,  # Ray restarts a dead worker; the supervisor starts its engine and rejoins it
            max_task_retries=0,  # a request on a dead worker is resumed by the router, not replayed by Ray
            runtime_env={"env_vars": env},
        ).remote(instance_id, config.engine, model_dir, kv)
        handles.append((instance_id, role, handle))
    infos = await asyncio.gather(*(h.start.remote() for _, _, h in handles))
    return [Instance(iid, role, h, info, WorkerChannel(info.request_address, secret))
            for (iid, role, h), info in zip(handles, infos, strict=True)]


@dataclass
class Deployment:
    """A running pdserve: workers, router and frontend. `stop()` takes it all down."""

    router: Router
    supervisor: Supervisor
    server: grpc.aio.Server
    port: int
    metrics_server: Any  # the /metrics HTTP server
    metrics_port: int
    http_server: Any  # the OpenAI-compatible HTTP frontend (`router.http_server.HttpServer`)
    http_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def drain(self, instance_id: str, timeout: float = 600.0, remove: bool = False) -> None:
        """Places no new request on the instance and returns once the requests it runs have ended; with `remove`,
        then takes it out of the deployment and stops its worker."""
        await self.router.drain(instance_id, timeout)
        if remove:
            instance = self.router.registry.remove(instance_id)
            await instance.channel.close()
            await asyncio.gather(instance.handle.shutdown.remote(), return_exceptions=True)
            ray.kill(instance.handle, no_restart=True)

    async def stop(self, grace: float = 5.0) -> None:
        await asyncio.gather(self.server.stop(grace), self.http_server.stop(grace))
        await self.supervisor.stop()
        self.metrics_server.shutdown()
        instances = self.router.registry.all()
        await asyncio.gather(*(i.channel.close() for i in instances))
        await asyncio.gather(*(i.handle.shutdown.remote() for i in instances), return_exceptions=True)
        for i in instances:
            ray.kill(i.handle)


async def deploy(config: ServeConfig) -> Deployment:
    from router.grpc_server import start_grpc
    from router.http_server import start_http
    from router.security import load_security

    security = load_security(config.router.tls, config.router.auth)  # before anything starts: fail fast
    model_dir = str(resolve_model(config.engine.model))
    init_ray(config.ray)
    secret = cluster_secret()
    instances = await start_workers(config, model_dir, secret)
    tokenizer = PromptTokenizer(model_dir)
    limits = Limits(
        model_name=served_name(config.engine.model),
        max_model_len=min(i.info.max_model_len for i in instances),
        max_tokens_limit=config.router.max_tokens_limit,
        vocab_size=tokenizer.vocab_size,
    )
    metrics = RouterMetrics()
    handoff = None
    if config.workers.mode != Role.COLOCATED:
        t = config.transfer
        budget = ReceiveBudget(t.receive_buffer_mib << 20)
        handoff = Handoff(t.deadline_s, t.min_prompt_tokens, budget, make_policy(config.router.prefill_policy),
                          t.layerwise)
    registry = Registry(instances)
    r = config.router
    router = Router(registry, make_policy(r.policy), tokenizer, limits, metrics, handoff,
                    Gate(r.max_outstanding, r.admission_queue, r.retry_after_s), load_predictor(r.predictor),
                    r.hold_queue)
    metrics.watch_pool(registry.all, lambda: router.admission.waiting)
    supervisor = supervise(registry, secret)
    server, port = await start_grpc(router, config.router.host, config.router.port, security)
    http_server, http_port = await start_http(router, config.router.host, config.router.http_port, security)
    metrics_server, metrics_port = serve_metrics(metrics, config.router.host, config.router.metrics_port)
    return Deployment(router, supervisor, server, port, metrics_server, metrics_port, http_server, http_port)


def load_predictor(head_file: str | None) -> TextPredictor | None:
    """The router's output-length predictor: a head trained by `pdserve predictor train`; None: no prediction."""
    if head_file is None:
        return None
    from router.predictor.learned import LearnedLengthPredictor  # torch, and MiniLM for an embedding head

    return LearnedLengthPredictor.load(head_file)


def served_name(model: str) -> str:
    """The name clients use for the model: the built-in name, or the folder's name."""
    return os.path.basename(os.path.normpath(model))

