"""Cluster bring-up: Ray, the worker actors, the router and its gRPC frontend, and their orderly shutdown.

Each pool's actors reserve their pool's Ray CPUs, GPUs and custom resources, so an operator places pools on node
groups by the resources those nodes advertise. Once Ray has placed them, every node's cores are laid out among the
instances that landed there (`worker.binding.bind_node`): each engine's OpenMP threads on cores of its own, the
actors' own threads on the node's cores no engine has (with none left over, those float).
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

from common.loop_lag import LoopLag
from common.roles import Role
from decode.worker import DecodeWorker, consumer_role
from kv_transfer.transport import SECRET_ENV
from pdserve.config import RayConfig, ServeConfig
from pdserve.links import check_links
from pdserve.models import resolve_model
from pdserve.supervisor import Supervisor, supervise
from prefill.worker import PrefillWorker, producer_role
from router.admission import Gate
from router.channel import WorkerChannel
from router.metrics import RouterMetrics, serve_metrics
from router.placement import make_policy
from router.placement.slo import Objectives
from router.predictor.prediction import TextPredictor
from router.receive_budget import ReceiveBudget
from router.registry import Instance, Registry
from router.service import Handoff, Router, RouterParts
from router.tokenizer import PromptTokenizer
from router.validation import Limits
from worker.binding import Binding, bind_node
from worker.busy_wait import BUSY_WAIT_ENV
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


def worker_env(engine: EngineConfig) -> dict[str, str]:
    """The environment of every engine's process (the cluster adds the secret to its workers')."""
    return {
        # Ray starts worker processes at nice 15; an engine there loses its core to any nice-0 process (the
        # router, Ray's own agents) and its steps slow down. Engines run at normal priority.
        "RAY_worker_niceness": "0",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_LOGGING_LEVEL": engine.log_level,
        # vLLM 0.32's ahead-of-time compile cache fails to load back ("'function' object has no attribute
        # 'finalize_loading'") and recompiles on every start; its older cache path reloads.
        "VLLM_USE_AOT_COMPILE": "0",
        BUSY_WAIT_ENV: str(engine.busy_wait_s),
    }


def cluster_secret() -> str:
    """The KV links' shared secret: from the environment when the operator set one, else fresh for this run."""
    return os.environ.get(SECRET_ENV) or secrets.token_hex(32)


def _actor(role: Role, instance_id: str, config: ServeConfig) -> tuple[type[EngineHost], KVRole | None]:
    """The actor class of a role and its engine's KV role."""
    if role == Role.PREFILL:
        return PrefillWorker, producer_role(instance_id, config.transfer)
    if role == Role.DECODE:
        return DecodeWorker, consumer_role(instance_id, config.transfer)
    return DecodeWorker, None


@dataclass(frozen=True)
class Worker:
    """One worker actor before its engine starts."""

    instance_id: str
    role: Role
    handle: Any  # its Ray actor handle
    cpus: int


async def _bindings(workers: list[Worker]) -> dict[str, Binding]:
    """Every worker's cores, laid out per node once Ray has placed the actors."""
    nodes = await asyncio.gather(*(w.handle.node.remote() for w in workers))
    by_node: dict[str, list[tuple[Worker, int]]] = {}
    for w, (node_id, node_cpus) in zip(workers, nodes, strict=True):
        by_node.setdefault(node_id, []).append((w, node_cpus))
    bindings = {}
    for placed in by_node.values():
        layout = bind_node([w.cpus for w, _ in placed], placed[0][1])
        bindings.update({w.instance_id: b for (w, _), b in zip(placed, layout, strict=True)})
    return bindings


async def start_workers(config: ServeConfig, model_dir: str, secret: str) -> tuple[list[Instance], dict[str, Binding]]:
    """Starts every pool's actors and engines; the instances, and each one's core binding (none: unbound)."""
    run = time.time_ns() // 1_000_000  # names this deployment's actors apart from a stopped one's
    # KV links and request channels accept only holders of the secret.
    env = {**worker_env(config.engine), SECRET_ENV: secret}
    workers = []
    for role, pool in config.workers.pools():
        engine = pool.engine_config(config.engine)
        for i in range(pool.instances):
            instance_id = f"{role}-{i}"
            cls, kv = _actor(role, instance_id, config)
            handle = ray.remote(cls).options(  # type: ignore[attr-defined]
                name=f"{instance_id}@{run}",  # unique per deployment: a stopped deployment's names may linger
                num_cpus=pool.cpus,
                num_gpus=pool.gpus,
                resources=dict(pool.resources),
                max_restarts=-1,  # Ray restarts a dead worker; the supervisor starts its engine and rejoins it
                max_task_retries=0,  # a request on a dead worker is resumed by the router, not replayed by Ray
                runtime_env={"env_vars": env},
            ).remote(instance_id, engine, model_dir, kv, config.workers.channel_port)
            workers.append(Worker(instance_id, role, handle, pool.cpus))
    bindings = await _bindings(workers) if config.workers.bind_threads else {}
    infos = await asyncio.gather(*(w.handle.start.remote(bindings.get(w.instance_id)) for w in workers))
    instances = [Instance(w.instance_id, w.role, w.handle, info, WorkerChannel(info.request_address, secret))
                 for w, info in zip(workers, infos, strict=True)]
    return instances, bindings


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
    loop_lag: LoopLag  # samples the router's event loop

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
        await asyncio.gather(self.supervisor.stop(), self.loop_lag.stop())
        self.metrics_server.shutdown()
        instances = self.router.registry.all()
        await asyncio.gather(*(i.channel.close() for i in instances))
        await asyncio.gather(*(i.handle.shutdown.remote() for i in instances), return_exceptions=True)
        for i in instances:
            ray.kill(i.handle)
        self.router.tokenizer.close()


async def deploy(config: ServeConfig) -> Deployment:
    from router.grpc_server import start_grpc
    from router.http_server import start_http
    from router.security import load_security

    security = load_security(config.router.tls, config.router.auth)  # before anything starts: fail fast
    model_dir = str(resolve_model(config.engine.model))
    init_ray(config.ray)
    secret = cluster_secret()
    instances, bindings = await start_workers(config, model_dir, secret)
    await check_links(instances)  # every prefill reaches every decode's KV listener, or start-up fails here
    tokenizer = PromptTokenizer(model_dir, config.router.max_prompt_bytes)
    limits = Limits(
        model_name=served_name(config.engine.model),
        max_model_len=min(i.info.max_model_len for i in instances),
        max_tokens_limit=config.router.max_tokens_limit,
        vocab_size=tokenizer.vocab_size,
    )
    metrics = RouterMetrics()
    r = config.router
    handoff = None
    if config.workers.mode != Role.COLOCATED:
        t = config.transfer
        budget = ReceiveBudget(t.receive_buffer_mib << 20)
        handoff = Handoff(t.deadline_s, t.min_prompt_tokens, budget, make_policy(r.prefill_policy), t.layerwise,
                          r.split_policy)
    tpot_s = None if r.slo.tpot_ms is None else r.slo.tpot_ms / 1000
    objectives = Objectives(r.slo.ttft_s, tpot_s, r.shed, r.retry_after_s)
    registry = Registry(instances)
    router = Router(RouterParts(registry, make_policy(r.policy), tokenizer, limits, metrics, handoff,
                                Gate(r.max_outstanding, r.admission_queue, r.retry_after_s),
                                load_predictor(r.predictor), r.hold_queue, objectives))
    metrics.watch_pool(registry.all, lambda: router.admission.waiting)
    loop_lag = LoopLag(metrics.loop_lag.observe)
    loop_lag.start()
    supervisor = supervise(registry, secret, bindings)
    server, port = await start_grpc(router, r.host, r.port, security, r)
    http_server, http_port = await start_http(router, r.host, r.http_port, security, r)
    metrics_server, metrics_port = serve_metrics(metrics, r.metrics_host, r.metrics_port)
    return Deployment(router, supervisor, server, port, metrics_server, metrics_port, http_server, http_port,
                      loop_lag)


def load_predictor(head_file: str | None) -> TextPredictor | None:
    """The router's output-length predictor: a head trained by `pdserve predictor train`; None: no prediction."""
    if head_file is None:
        return None
    from router.predictor.learned import LearnedLengthPredictor  # torch, and MiniLM for an embedding head

    return LearnedLengthPredictor.load(head_file)


def served_name(model: str) -> str:
    """The name clients use for the model: the built-in name, or the folder's name."""
    return os.path.basename(os.path.normpath(model))

