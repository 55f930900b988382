"""A Ray cluster of three nodes on this machine, each node in a network namespace of its own, and pdserve across it.

    node A  netns pdmnA-<id>  10.213.0.1/24  Ray head, resource pdserve-prefill, the pdserve driver (router)
    node B  netns pdmnB-<id>  10.213.0.2/24  Ray worker node, resources pdserve-node-b and pdserve-decode
    node C  netns pdmnC-<id>  10.213.0.3/24  Ray worker node, resources pdserve-node-c and pdserve-decode

A bridge in a fourth namespace joins the three. Each node reserves one CPU; the pools' Ray resources put the
prefill actor on A and the decode actors on B (`pdserve-node-b`: 1P1D) or on B and C (`pdserve-decode`: 1P2D). The
pdserve driver (`pdserve serve`) runs in A and serves its router on 127.0.0.1 there; the tests reach it with client
runs inside A (`tests/multinode/client.py`). `Cluster.cut(port)` makes one tcp port of the other nodes unreachable
from each node (a policy-routing rule sends that destination port to an `unreachable` route: connects fail at
once with "No route to host"), while Ray and the request channels go on; `Cluster.kill_node` loses a node whole.

The namespaces, Ray on them, the cuts and the teardown are `pdserve_tools.netns` (which `pdserve bench multinode`
runs too). Making namespaces needs root and iproute2: without them the tests fail, they never skip. Everything is
torn down by process id, even when a test fails: every process `ip netns pids` lists in either namespace is sent
SIGTERM, then SIGKILL if it has not exited within a grace period (waited on through pidfds), then the namespaces go
(and their veth pair with them). Ray's files live in a temporary folder of their own (`RAY_TMPDIR`), so nothing here
touches another Ray on this machine.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pdserve_tools.netns import VENV_BIN, Background, Cluster, NamespaceError, cluster_of, make_nodes
from tests.conftest import TINY_ENGINE
from tests.integration.conftest import MAX_TOKENS, reference  # noqa: F401  (plain vLLM's tokens, a fixture)

ROOT = Path(__file__).resolve().parents[2]
READY_LINE = "pdserve serving gRPC on"
DECODE = "pdserve-decode"  # the resource nodes B and C both offer


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    nodes = make_nodes(secrets.token_hex(3), ("pdserve-prefill", "pdserve-node-b", "pdserve-node-c"),
                       also=((), (DECODE,), (DECODE,)))
    try:
        with cluster_of(nodes, cwd=ROOT) as c:
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

    def client_args(self, specs: tuple[int | str, ...], max_tokens: int, *options: str) -> list[str]:
        return ["-m", "tests.multinode.client", "--target", self.target, "--metrics-port",
                str(self.ports["metrics_port"]), "--max-tokens", str(max_tokens), *options, *map(str, specs)]

    def client(self, *specs: int | str, max_tokens: int = MAX_TOKENS, options: tuple[str, ...] = ()) -> dict[str, Any]:
        """Completes prompts (`tests.multinode.client`'s: an index in `tests.integration.conftest.prompts()`, or
        "chat") from inside node A; what the client printed."""
        done = self.cluster.run(self.cluster.a, str(VENV_BIN / "python"),
                                *self.client_args(specs, max_tokens, *options), timeout=240)
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    def streams(self, *specs: int | str, max_tokens: int) -> Background:
        """Streams the prompts all at once from inside node A, EOS ignored; running in the background (it prints
        `STARTED` once each stream has its first token, then its JSON at the end)."""
        argv = [str(VENV_BIN / "python"), *self.client_args(specs, max_tokens, "--concurrent", "--ignore-eos")]
        return Background(self.cluster, self.cluster.a, argv, "the streaming client")

    def stop(self) -> None:
        self.process.stop(grace_s=30.0)


@contextlib.contextmanager
def serve(c: Cluster, tiny: Path, tmp: Path, namespace: str, decode: dict[str, Any],
          router: dict[str, Any] | None = None, **transfer: Any) -> Iterator[Served]:
    """pdserve with its prefill instance on A and the `decode` pool where its resources put it, with these router
    and transfer settings, in Ray namespace `namespace`."""
    ports = {"port": 50051, "http_port": 8000, "metrics_port": 9400}
    config = {
        "ray": {"address": c.address, "namespace": namespace},
        "engine": {"model": str(tiny), **TINY_ENGINE},
        "workers": {
            "mode": "disaggregated",
            "bind_threads": False,  # each node's one CPU is this machine's two cores; nothing to lay out
            "prefill": {"instances": 1, "cpus": 1, "resources": {c.a.resource: 1}},
            "decode": {"cpus": 1, **decode},
        },
        "transfer": transfer,
        "router": {"host": "127.0.0.1", "max_tokens_limit": 512, **ports, **(router or {})},
    }
    path = tmp / "pdserve.yaml"
    path.write_text(yaml.safe_dump(config))
    served = Served(c, path, ports, namespace)
    try:
        served.wait_for(READY_LINE, timeout=300)
        yield served
    finally:
        served.stop()


def sample(metrics: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus exposition text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    key = f"{name}{{{want}}}" if labels else name
    for line in metrics.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


def total(metrics: str, name: str) -> float:
    """The sum of a metric's samples over all their labels."""
    return sum(float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith((name + " ", name + "{")))


def inspect(served: Served) -> dict[str, Any]:
    """The workers as a second driver sees them, and the start-up check of the links run against them."""
    c = served.cluster
    report: dict[str, Any] = c.python(c.a, "tests.multinode.inspect_cluster", "--address", c.address,
                                      "--namespace", served.namespace)
    return report


# Prompts of 7 tokens (under one KV block), 129 (one block and one token) and 773 (many blocks).
PROMPTS = (1, 4, 6)
