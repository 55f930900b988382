"""A Ray cluster of two nodes on this machine, each node in a network namespace of its own, and pdserve across it.

    node A  netns pdmnA-<id>  veth 10.213.0.1/24  Ray head, resource pdserve-prefill, the pdserve driver (router)
    node B  netns pdmnB-<id>  veth 10.213.0.2/24  Ray worker node, resource pdserve-decode

Each node reserves one CPU; the pools' Ray resources put the prefill actor on A and the decode actor on B. The
pdserve driver (`pdserve serve`) runs in A and serves its router on 127.0.0.1 there; the tests reach it with client
runs inside A (`tests/multinode/client.py`). `Cluster.cut(port)` makes one tcp port of the other node unreachable
from each node (a policy-routing rule sends that destination port to an `unreachable` route: connects fail at
once with "No route to host"), while Ray and the request channels go on.

The namespaces, Ray on them, the cuts and the teardown are `pdserve_tools.netns` (which `pdserve bench multinode`
runs too). Making namespaces needs root and iproute2: without them the tests fail, they never skip. Everything is
torn down by process id, even when a test fails: every process `ip netns pids` lists in either namespace is sent
SIGTERM, then SIGKILL if it has not exited within a grace period (waited on through pidfds), then the namespaces go
(and their veth pair with them). Ray's files live in a temporary folder of their own (`RAY_TMPDIR`), so nothing here
touches another Ray on this machine.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pdserve_tools.netns import VENV_BIN, Background, Cluster, NamespaceError, node_pair, two_nodes
from tests.conftest import TINY_ENGINE
from tests.integration.conftest import MAX_TOKENS, reference  # noqa: F401  (plain vLLM's tokens, a fixture)

ROOT = Path(__file__).resolve().parents[2]
READY_LINE = "pdserve serving gRPC on"
NAMESPACE = "pdserve-multinode"


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    a, b = node_pair(secrets.token_hex(3), ("pdserve-prefill", "pdserve-decode"))
    try:
        with two_nodes(a, b, cwd=ROOT) as c:
            yield c
    except NamespaceError as e:
        pytest.fail(str(e))


class Served:
    """A `pdserve serve` process in node A's namespace, and everything it wrote to stdout and stderr."""

    def __init__(self, c: Cluster, config: Path, ports: dict[str, int], namespace: str) -> None:
        self.cluster = c
        self.ports = ports
        self.namespace = namespace  # the deployment's Ray namespace
        self.report: dict[str, Any] = {}  # what `tests.multinode.inspect_cluster` last said
        self.process = Background(c, c.a, [str(VENV_BIN / "pdserve"), "serve", "--config", str(config)],
                                  "pdserve serve")

    @property
    def lines(self) -> list[str]:
        return self.process.lines

    def wait_for(self, text: str, timeout: float) -> str:
        """The first output line that contains `text`; fails if the process ends or `timeout` passes first."""
        return self.process.wait_for(text, timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.ports['port']}"

    def client(self, *indices: int) -> dict[str, Any]:
        """Completes prompts (by index in `tests.integration.conftest.prompts()`) from inside node A."""
        args = ["--target", self.target, "--metrics-port", str(self.ports["metrics_port"]),
                "--max-tokens", str(MAX_TOKENS), *map(str, indices)]
        result: dict[str, Any] = self.cluster.python(self.cluster.a, "tests.multinode.client", *args, timeout=240)
        return result

    def stop(self) -> None:
        self.process.stop(grace_s=30.0)


@contextlib.contextmanager
def serve(c: Cluster, tiny: Path, tmp: Path, **transfer: Any) -> Iterator[Served]:
    """pdserve 1P1D across the two nodes (prefill on A, decode on B) with these transfer settings."""
    ports = {"port": 50051, "http_port": 8000, "metrics_port": 9400}
    config = {
        "ray": {"address": c.address, "namespace": NAMESPACE},
        "engine": {"model": str(tiny), **TINY_ENGINE},
        "workers": {
            "mode": "disaggregated",
            "bind_threads": False,  # each node's one CPU is this machine's two cores; nothing to lay out
            "prefill": {"instances": 1, "cpus": 1, "resources": {c.a.resource: 1}},
            "decode": {"instances": 1, "cpus": 1, "resources": {c.b.resource: 1}},
        },
        "transfer": transfer,
        "router": {"host": "127.0.0.1", "max_tokens_limit": 512, **ports},
    }
    path = tmp / "pdserve.yaml"
    path.write_text(yaml.safe_dump(config))
    served = Served(c, path, ports, NAMESPACE)
    try:
        served.wait_for(READY_LINE, timeout=300)
        yield served
    finally:
        served.stop()


# Prompts of 7 tokens (under one KV block), 129 (one block and one token) and 773 (many blocks).
PROMPTS = (1, 4, 6)
