"""A Ray cluster of two nodes on this machine, each node in a network namespace of its own, and pdserve across it.

    node A  netns pdmnA-<id>  veth 10.213.0.1/24  Ray head, resource pdserve-prefill, the pdserve driver (router)
    node B  netns pdmnB-<id>  veth 10.213.0.2/24  Ray worker node, resource pdserve-decode

Each node reserves one CPU; the pools' Ray resources put the prefill actor on A and the decode actor on B. The
pdserve driver (`pdserve serve`) runs in A and serves its router on 127.0.0.1 there; the tests reach it with client
runs inside A (`tests/multinode/client.py`). `Cluster.cut(port)` makes one tcp port of the other node unreachable
from each node (a policy-routing rule sends that destination port to an `unreachable` route: connects fail at
once with "No route to host"), while Ray and the request channels go on.

Making namespaces needs root and iproute2: without them the tests fail, they never skip. Everything is torn down
by process id, even when a test fails: every process `ip netns pids` lists in either namespace is sent SIGTERM,
then SIGKILL if it has not exited within a grace period (waited on through pidfds), then the namespaces go (and
their veth pair with them). Ray's files live in a temporary folder of their own (`RAY_TMPDIR`), so nothing here
touches another Ray on this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import TINY_ENGINE
from tests.integration.conftest import MAX_TOKENS, reference  # noqa: F401  (plain vLLM's tokens, a fixture)

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SUBNET = "10.213.0"
CUT_TABLE, CUT_PRIORITY = "213", "100"
RAY_PORT = 6379
GRACE_S = 3.0  # Ray's daemons linger on SIGTERM (graceful shutdown); the tests need none of that
READY_LINE = "pdserve serving gRPC on"
NAMESPACE = "pdserve-multinode"


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")


@dataclass(frozen=True)
class Node:
    netns: str
    ip: str
    resource: str  # the Ray custom resource this node offers (one unit)


@dataclass
class Cluster:
    a: Node
    b: Node
    env: dict[str, str]  # for every process of the cluster: Ray's auth token, its temporary folder
    tmp: Path
    cut_ports: list[int] = field(default_factory=list)
    cut_table: bool = False  # whether each node's routing table CUT_TABLE holds its `unreachable` route

    @property
    def address(self) -> str:
        return f"{self.a.ip}:{RAY_PORT}"

    def command(self, node: Node, *argv: str) -> list[str]:
        env = [f"{k}={v}" for k, v in self.env.items()]
        return ["ip", "netns", "exec", node.netns, "env", *env, *argv]

    def run(self, node: Node, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self.command(node, *argv), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {node.netns} failed ({done.returncode}):\n{done.stdout}\n"
                               f"{done.stderr}")
        return done

    def python(self, node: Node, module: str, *args: str, timeout: float = 120) -> Any:
        """Runs `python -m module args` in `node`'s namespace; its stdout's last line, read as JSON."""
        done = self.run(node, str(VENV_BIN / "python"), "-m", module, *args, timeout=timeout)
        return json.loads(done.stdout.strip().splitlines()[-1])

    def cut(self, port: int) -> None:
        """Connections to tcp `port` fail at once with "No route to host", from either node; nothing else changes."""
        for node in (self.a, self.b):
            _ip("-n", node.netns, "rule", "add", "ipproto", "tcp", "dport", str(port), "table", CUT_TABLE,
                "priority", CUT_PRIORITY)
            if not self.cut_table:
                _ip("-n", node.netns, "route", "add", "unreachable", "default", "table", CUT_TABLE)
        self.cut_table = True
        self.cut_ports.append(port)

    def mend(self) -> None:
        while self.cut_ports:
            port = self.cut_ports.pop()
            for node in (self.a, self.b):
                _ip("-n", node.netns, "rule", "del", "ipproto", "tcp", "dport", str(port), "table", CUT_TABLE,
                    "priority", CUT_PRIORITY)


def _make_namespaces(a: Node, b: Node, suffix: str) -> None:
    va, vb = f"pdmva{suffix}", f"pdmvb{suffix}"
    _ip("netns", "add", a.netns)
    _ip("netns", "add", b.netns)
    _ip("-n", a.netns, "link", "add", va, "type", "veth", "peer", "name", vb, "netns", b.netns)  # never in ours
    for node, dev in ((a, va), (b, vb)):
        _ip("-n", node.netns, "addr", "add", f"{node.ip}/24", "dev", dev)
        _ip("-n", node.netns, "link", "set", "lo", "up")
        _ip("-n", node.netns, "link", "set", dev, "up")


def _pids(netns: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=30)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def kill_by_id(pids: list[int], grace_s: float = GRACE_S) -> None:
    """SIGTERM to each process, then SIGKILL to those still running after `grace_s` (waited on through pidfds)."""
    fds = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds[pid] = os.pidfd_open(pid)
            os.kill(pid, signal.SIGTERM)
    pending = set(fds.values())
    deadline = time.monotonic() + grace_s
    while pending and (left := deadline - time.monotonic()) > 0:
        exited, _, _ = select.select(list(pending), [], [], left)  # a pidfd turns readable when its process ends
        pending -= set(exited)
    for fd in fds.values():
        if fd in pending:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        os.close(fd)


def _tear_down(nodes: list[Node]) -> None:
    pids = [pid for node in nodes for pid in _pids(node.netns)]
    kill_by_id(pids)
    for node in nodes:
        kill_by_id(_pids(node.netns))  # anything started meanwhile (a worker a raylet was spawning)
        with contextlib.suppress(RuntimeError):
            _ip("netns", "del", node.netns)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    suffix = secrets.token_hex(3)
    a = Node(f"pdmnA-{suffix}", f"{SUBNET}.1", "pdserve-prefill")
    b = Node(f"pdmnB-{suffix}", f"{SUBNET}.2", "pdserve-decode")
    tmp = Path(tempfile.mkdtemp(prefix="pdmn-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_TMPDIR": str(tmp),
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    c = Cluster(a, b, env, tmp)
    try:
        try:
            _make_namespaces(a, b, suffix)
        except (RuntimeError, OSError) as e:
            pytest.fail(f"cannot make the network namespaces of a two-node cluster (root and iproute2 needed): {e}")
        ray = str(VENV_BIN / "ray")
        common = ["--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats"]
        c.run(a, ray, "start", "--head", f"--node-ip-address={a.ip}", f"--port={RAY_PORT}",
              "--include-dashboard=false", f"--resources={json.dumps({a.resource: 1})}", *common)
        c.run(b, ray, "start", f"--address={c.address}", f"--node-ip-address={b.ip}",
              f"--resources={json.dumps({b.resource: 1})}", *common)
        yield c
    finally:
        _tear_down([a, b])
        shutil.rmtree(tmp, ignore_errors=True)


class Served:
    """A `pdserve serve` process in node A's namespace, and everything it wrote to stdout and stderr."""

    def __init__(self, c: Cluster, config: Path, ports: dict[str, int], namespace: str) -> None:
        self.cluster = c
        self.ports = ports
        self.namespace = namespace  # the deployment's Ray namespace
        self.report: dict[str, Any] = {}  # what `tests.multinode.inspect_cluster` last said
        self.lines: list[str] = []
        self.ended = False
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(c.command(c.a, str(VENV_BIN / "pdserve"), "serve", "--config", str(config)),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def wait_for(self, text: str, timeout: float) -> str:
        """The first output line that contains `text`; fails if the process ends or `timeout` passes first."""
        def found() -> str | None:
            return next((line for line in self.lines if text in line), None)

        with self._changed:
            self._changed.wait_for(lambda: found() or self.ended, timeout)
            line = found()
        if line is None:
            raise AssertionError(f"pdserve serve did not print {text!r} within {timeout:.0f} s "
                                 f"(exit code {self.proc.poll()}); its output:\n{''.join(self.lines)[-8000:]}")
        return line

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
        if self.proc.poll() is None:
            kill_by_id([self.proc.pid], grace_s=30.0)
        self.proc.wait(timeout=30)
        self._reader.join(timeout=30)


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
