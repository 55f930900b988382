"""pdserve as a benchmark target: `pdserve serve` in a process of its own, as a user runs it.

Contract. `pdserve_server(config, log)` writes `config` (a serve config as a dict, ports 0) to a file next to
`log`, starts `python -m pdserve.cli serve --config FILE` in its own process group (in the benchmark's session, as the
vLLM peers: `peers.ServerProcess`) with its output in `log`, and
yields the addresses it printed once it serves: `(grpc_target "HOST:PORT", http_base_url "http://HOST:PORT/v1",
metrics_url "http://HOST:PORT/metrics")`. `pdserve_process` does the same and yields a `Served`: those addresses and
the process id, which is the router's (`pdserve serve` runs the router in the process it starts as).
A server that exits first, or does not serve within `STARTUP_TIMEOUT_S`, raises `PeerStartError` with the tail of
its log. On exit the group gets SIGTERM (pdserve stops its deployment and its local Ray), and SIGKILL for what is
left of it after a grace period, like the vLLM peers (`pdserve_tools.bench.peers.ServerProcess`).

The benchmark's load generator and the target then share nothing but the machine: no event loop, no GIL, the same
as for the vLLM peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pdserve_tools.bench.peers import STARTUP_TIMEOUT_S, ServerProcess, start_failure

SERVING = re.compile(r"pdserve serving gRPC on (\S+), OpenAI-compatible HTTP on (\S+), metrics on (\S+)")
STOP_GRACE_S = 30.0  # pdserve stops its engines, then its local Ray


@dataclass(frozen=True)
class Served:
    """A running `pdserve serve`: where it answers, and its process (the router's)."""

    grpc_target: str  # "HOST:PORT"
    http_url: str  # "http://HOST:PORT/v1"
    metrics_url: str  # "http://HOST:PORT/metrics"
    pid: int


@contextlib.asynccontextmanager
async def pdserve_server(config: dict[str, Any], log: Path) -> AsyncIterator[tuple[str, str, str]]:
    async with pdserve_process(config, log) as served:
        yield served.grpc_target, served.http_url, served.metrics_url


@contextlib.asynccontextmanager
async def pdserve_process(config: dict[str, Any], log: Path) -> AsyncIterator[Served]:
    log.parent.mkdir(parents=True, exist_ok=True)
    config_file = log.with_suffix(".yaml")
    config_file.write_text(yaml.safe_dump(config))
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "serve", "--config", str(config_file)],
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   process_group=0)  # the benchmark's session: see `ServerProcess`
    server = ServerProcess("pdserve", process, "", log, None)
    try:
        grpc_target, http_url, metrics_url = await _serving(process, log)
        server.url = http_url.removesuffix("/v1")
        yield Served(grpc_target, http_url, metrics_url, process.pid)
    finally:
        await server.stop(STOP_GRACE_S)


async def _serving(process: subprocess.Popen[bytes], log: Path) -> tuple[str, str, str]:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        found = SERVING.search(log.read_text(errors="replace"))
        if found:
            return found.group(1), found.group(2), found.group(3)
        if (code := process.poll()) is not None:
            raise start_failure("pdserve", f"exited with code {code} before it served", log)
        if time.monotonic() > deadline:
            raise start_failure("pdserve", f"did not serve within {STARTUP_TIMEOUT_S:.0f} s", log)
        await asyncio.sleep(0.25)  # polling period: the log is where the server says it is ready
