"""The targets `pdserve bench serve` compares, and the drivers that send them requests.

Contract. `started(spec)` is an async context manager: it starts one target on this machine, yields a
`Driver` for it, and stops the target on exit, whatever happened. A `Driver` has one method,
`send(request, timeout) -> RequestTrace`, which never raises: a failed request comes back as a trace with an
error. Every target is driven through its OpenAI-compatible HTTP port by the same `OpenAIDriver` (so the
figures compare servers, not clients), except that `client="grpc"` drives a pdserve target through the
gRPC SDK instead. The model name sent to an OpenAI server is the one its `/v1/models` reports. A pdserve target
runs as `pdserve serve` in a process of its own (`pdserve_server`), like the vLLM peers, so that the load
generator shares no event loop or GIL with the router; `in_process=True` deploys it in this process instead.

Targets (the same cores, one after another):
- `pdserve-disagg`: pdserve 1P1D (one prefill and one decode instance, one core each).
- `pdserve-sooner`: pdserve 1P1D with `router.split_policy: sooner` (a request runs whole on the decode instance
  when that is sooner), keeping the TPOT objective of the base config's `router.slo.tpot_ms` (`bench serve` sets it
  to its own `--slo-tpot-ms`).
- `pdserve-colocated`: pdserve with two colocated instances (one core each), the same router.
- `pdserve-1p2d`: pdserve 1P2D, decodes placed by `least_outstanding` (three engines on the cores, wrapping).
- `pdserve-1p2d-projected`: the same with decodes placed by `projected_kv` (length-aware; the base config's
  `router.predictor` and `router.hold_queue` apply to every pdserve target).
- `vllm`: one plain vLLM OpenAI server on one core, the single-engine reference.
- `vllm-2x`: two plain vLLM servers (one core each) behind a round-robin proxy.
- `vllm-disagg`: vLLM's own disaggregated prefill as its example runs it (`peers.vllm_disagg_example`): a
  producer and a consumer server (one core each) with vLLM's `ExampleConnector` (KV through files), behind a
  proxy that prefills on the producer and then runs the request on the consumer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager as AsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pdserve.config import EngineConfig, ServeConfig, config_from_dict
from pdserve_tools.bench.serve_engines import EngineCounters
from pdserve_tools.bench.serve_metrics import RequestTrace
from pdserve_tools.bench.workload import BenchRequest

ONE_P_TWO_D = {"mode": "disaggregated", "prefill": {"instances": 1}, "decode": {"instances": 2}}
ONE_P_ONE_D = {"mode": "disaggregated", "prefill": {"instances": 1}, "decode": {"instances": 1}}
PDSERVE_TARGETS: dict[str, dict[str, Any]] = {
    "pdserve-disagg": ONE_P_ONE_D,
    "pdserve-sooner": ONE_P_ONE_D,
    "pdserve-colocated": {"mode": "colocated", "colocated": {"instances": 2}},
    "pdserve-1p2d": ONE_P_TWO_D,
    "pdserve-1p2d-projected": ONE_P_TWO_D,
}
DECODE_POLICY = {"pdserve-1p2d": "least_outstanding", "pdserve-1p2d-projected": "projected_kv"}  # else the base's
SPLIT_POLICY = {"pdserve-sooner": "sooner"}  # else "always"
PEER_TARGETS: dict[str, int] = {"vllm": 1, "vllm-2x": 2, "vllm-disagg": 2}  # vLLM servers, one core each
TARGETS = [*PDSERVE_TARGETS, *PEER_TARGETS]
CLIENTS = ("openai", "grpc")


class Driver(Protocol):
    async def send(self, request: BenchRequest, timeout: float) -> RequestTrace: ...


class Counted:
    """A pdserve target's driver that also reads the target's engine counters from its Prometheus endpoint."""

    def __init__(self, driver: Driver, metrics_url: str) -> None:
        self._driver = driver
        self._metrics_url = metrics_url

    async def send(self, request: BenchRequest, timeout: float) -> RequestTrace:
        return await self._driver.send(request, timeout)

    async def counters(self) -> EngineCounters:
        """The target's engine counters so far (as of the router's last heartbeat from each instance, 1 s)."""
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30.0)) as http, \
                http.get(self._metrics_url) as reply:
            reply.raise_for_status()
            return EngineCounters.parse(await reply.text())


async def engine_counters(driver: Driver) -> EngineCounters | None:
    """The target's engine counters so far, for targets that report them (pdserve); None for the others."""
    return await driver.counters() if isinstance(driver, Counted) else None


@dataclass(frozen=True)
class TargetSpec:
    name: str  # one of TARGETS
    base: ServeConfig  # its engine and transfer sections apply to every target
    model: str | None  # overrides base.engine.model
    client: str = "openai"  # "grpc": pdserve targets through the SDK
    log_dir: Path = Path("bench-results/serve-logs")  # the servers' logs
    in_process: bool = False  # pdserve deployed in the benchmark's own process and event loop

    def __post_init__(self) -> None:
        if self.name not in TARGETS:
            raise ValueError(f"unknown target {self.name!r}; choose from {', '.join(TARGETS)}")
        if self.client not in CLIENTS:
            raise ValueError(f"unknown client {self.client!r}; choose from {', '.join(CLIENTS)}")
        if self.client == "grpc" and self.name not in PDSERVE_TARGETS:
            raise ValueError(f"--client grpc drives pdserve targets only, not {self.name!r}")

    @property
    def engine(self) -> EngineConfig:
        return dataclasses.replace(self.base.engine, model=self.model) if self.model else self.base.engine


def target_data(base: ServeConfig, name: str, model: str | None) -> dict[str, object]:
    """Pdserve target `name`'s serve config, as the YAML document `pdserve serve` reads (ports 0: any free one)."""
    r = base.router
    return {
        "ray": {"num_cpus": max(4, os.cpu_count() or 2), "log_to_driver": False},
        "engine": dataclasses.asdict(base.engine) | ({"model": model} if model else {}),
        "workers": PDSERVE_TARGETS[name],
        "transfer": dataclasses.asdict(base.transfer),
        "router": {"port": 0, "http_port": 0, "metrics_port": 0, "max_tokens_limit": r.max_tokens_limit,
                   "policy": DECODE_POLICY.get(name, r.policy), "predictor": r.predictor, "hold_queue": r.hold_queue,
                   "split_policy": SPLIT_POLICY.get(name, "always"), "slo": dataclasses.asdict(r.slo)},
    }


class GrpcDriver:
    """A pdserve target through the gRPC SDK (async context manager)."""

    def __init__(self, target: str) -> None:
        from pdserve_client import AsyncClient

        self._client = AsyncClient(target)

    async def __aenter__(self) -> GrpcDriver:
        await self._client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.__aexit__(*exc)

    async def send(self, request: BenchRequest, timeout: float) -> RequestTrace:
        prompt = request.prompt if isinstance(request.prompt, str) else list(request.prompt)
        sent = time.monotonic()
        times: list[float] = []
        tokens: list[int] = []
        try:
            async for chunk in self._client.generate(prompt, max_tokens=request.max_tokens, temperature=0.0,
                                                     ignore_eos=request.ignore_eos, timeout=timeout):
                if chunk.token_ids:
                    times.append(time.monotonic())
                    tokens.append(len(chunk.token_ids))
        except Exception as e:  # a failed request is part of the result, counted by its error
            return RequestTrace(sent, tuple(times), tuple(tokens), request.prompt_tokens, error=type(e).__name__)
        if not times:
            return RequestTrace(sent, (), (), request.prompt_tokens, error="EmptyStream")
        return RequestTrace(sent, tuple(times), tuple(tokens), request.prompt_tokens)


async def served_model(base_url: str) -> str:
    """The first model an OpenAI-compatible server lists at /v1/models."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30.0)) as http, \
            http.get(f"{base_url}/models") as reply:
        reply.raise_for_status()
        return str((await reply.json())["data"][0]["id"])


@contextlib.asynccontextmanager
async def _openai(base_url: str) -> AsyncIterator[Driver]:
    from pdserve_tools.bench.openai_driver import OpenAIDriver

    async with OpenAIDriver(base_url, await served_model(base_url)) as driver:
        yield driver


def _pdserve_driver(spec: TargetSpec, grpc_target: str, base_url: str) -> AsyncContextManager[Driver]:
    return GrpcDriver(grpc_target) if spec.client == "grpc" else _openai(base_url)


@contextlib.asynccontextmanager
async def _pdserve(spec: TargetSpec) -> AsyncIterator[Driver]:
    data = target_data(spec.base, spec.name, spec.model)
    if not spec.in_process:  # its own process, as a user runs it and as the vLLM peers run
        from pdserve_tools.bench.pdserve_server import pdserve_server

        async with pdserve_server(data, spec.log_dir / spec.name / "pdserve.log") as (grpc_target, base_url, metrics),\
                _pdserve_driver(spec, grpc_target, base_url) as driver:
            yield Counted(driver, metrics)
        return
    from pdserve.cluster import deploy

    dep = await deploy(config_from_dict(data))
    try:
        async with _pdserve_driver(spec, dep.target, f"http://127.0.0.1:{dep.http_port}/v1") as driver:
            yield Counted(driver, f"http://127.0.0.1:{dep.metrics_port}/metrics")
    finally:
        await dep.stop()


@contextlib.asynccontextmanager
async def _peer(spec: TargetSpec) -> AsyncIterator[Driver]:
    from pdserve.models import resolve_model
    from pdserve_tools.bench.peers import vllm_disagg_example, vllm_openai  # here: pdserve targets run without them

    engine = spec.engine
    model_dir = str(resolve_model(engine.model))
    log_dir = spec.log_dir / spec.name
    async with contextlib.AsyncExitStack() as stack:
        servers = (vllm_disagg_example(engine, model_dir, 1, log_dir) if spec.name == "vllm-disagg"
                   else vllm_openai(engine, model_dir, PEER_TARGETS[spec.name], 1, log_dir))
        base_url = await stack.enter_async_context(servers)
        yield await stack.enter_async_context(_openai(base_url))


def started(spec: TargetSpec) -> AsyncContextManager[Driver]:
    return _pdserve(spec) if spec.name in PDSERVE_TARGETS else _peer(spec)
