"""A Ray cluster of several nodes on this machine, each node in a network namespace of its own (DESIGN.md, "A cluster
of several nodes on one machine").

    node A  netns <prefix>A-<suffix>  veth <dev>a<suffix> 10.213.0.1/24  Ray head (and the pdserve driver, if any)
    node B  netns <prefix>B-<suffix>  veth <dev>b<suffix> 10.213.0.2/24  Ray worker node
    node C  ...                                             10.213.0.3/24  (and so on)
    switch  netns <prefix>S-<suffix>  bridge: the other end of every node's veth

Contract. `cluster_of(nodes)` is a context manager: it makes a namespace per node and a switch namespace whose
bridge joins the nodes' veth pairs, starts the Ray head on the first node and a worker node on each other one (each
offering its `cpus`, and `units` of its custom `resource` and of each resource in `also`), yields a `Cluster`, and
tears everything down on exit, however it ends. `two_nodes(a, b)` is the same for two. Namespaces that cannot be
made (root and iproute2 are needed) raise `NamespaceError` and nothing else does, so a caller can tell "this machine
cannot" from "this run failed". Teardown is by process id only: every process `ip netns pids` lists in a node's
namespace gets SIGTERM, then SIGKILL if it has not exited within a grace period (waited on through pidfds); then the
namespaces go, and the veth pairs with them. Ray's files live in a temporary folder of their own (`RAY_TMPDIR`), so
nothing here touches another Ray on this machine.

A `Cluster` runs commands in a node's namespace (`run`, `python`: to completion; `Background`: a long-running one
whose output it keeps), shapes the links (`shape`: a `tbf` qdisc at the root of every node's veth end, so whatever
leaves a node is capped; `netem` is not in this kernel), cuts single tcp ports (`cut`, `mend`: a policy-routing
rule sends the port to an `unreachable` route, so connects fail at once with "No route to host" while everything
else goes on) and loses a whole node (`kill_node`: SIGKILL to every process in its namespace, Ray's included).
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VENV_BIN = Path(sys.executable).parent
SUBNET = "10.213.0"
CUT_TABLE, CUT_PRIORITY = "213", "100"
RAY_PORT = 6379
GRACE_S = 3.0  # Ray's daemons linger on SIGTERM (graceful shutdown); a torn-down cluster needs none of that
OBJECT_STORE_BYTES = 100_000_000


class NamespaceError(RuntimeError):
    """The network namespaces of the cluster could not be made (root and iproute2 are needed)."""


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")


@dataclass(frozen=True)
class Node:
    netns: str
    ip: str
    resource: str  # the Ray custom resource this node offers
    dev: str  # its end of the veth pair (at most 15 characters)
    cpus: int = 1  # Ray CPUs the node offers
    units: int = 1  # units of `resource` (and of each of `also`) it offers
    also: tuple[str, ...] = ()  # further custom resources it offers, shared with other nodes (a pool's)

    @property
    def port(self) -> str:
        """Its veth pair's end on the switch's bridge."""
        return "s" + self.dev[1:]

    @property
    def resources(self) -> dict[str, int]:
        return {name: self.units for name in (self.resource, *self.also)}


def make_nodes(suffix: str, resources: Sequence[str], cpus: Sequence[int] | None = None, prefix: str = "pdmn",
               also: Sequence[Sequence[str]] | None = None) -> tuple[Node, ...]:
    """Nodes A (10.213.0.1), B (10.213.0.2), ..., one per resource, named apart by `suffix`; each offers as many
    units of its resource (and of its `also` ones) as it has CPUs."""
    cpus = cpus or [1] * len(resources)
    also = also or [()] * len(resources)
    short = prefix[:4]
    letters = "ABCDEFGH"[:len(resources)]
    return tuple(Node(f"{prefix}{letter}-{suffix}", f"{SUBNET}.{i + 1}", resource,
                      f"{short}v{letter.lower()}{suffix}", n, n, tuple(extra))
                 for i, (letter, resource, n, extra) in enumerate(zip(letters, resources, cpus, also, strict=True)))


def node_pair(suffix: str, resources: tuple[str, str], cpus: tuple[int, int] = (1, 1),
              prefix: str = "pdmn") -> tuple[Node, Node]:
    """Nodes A and B of `make_nodes`."""
    a, b = make_nodes(suffix, resources, cpus, prefix)
    return a, b


@dataclass
class Cluster:
    nodes: tuple[Node, ...]  # the first one holds the Ray head
    switch: str  # the namespace of the bridge between the nodes
    env: dict[str, str]  # for every process of the cluster: Ray's auth token, its temporary folder
    tmp: Path
    cwd: Path | None = None  # where its commands run (a module run with `python -m` is found from there)
    cut_ports: list[int] = field(default_factory=list)
    cut_table: bool = False  # whether each node's routing table CUT_TABLE holds its `unreachable` route

    @property
    def a(self) -> Node:
        return self.nodes[0]

    @property
    def b(self) -> Node:
        return self.nodes[1]

    @property
    def c(self) -> Node:
        return self.nodes[2]

    @property
    def address(self) -> str:
        return f"{self.a.ip}:{RAY_PORT}"

    def command(self, node: Node, *argv: str) -> list[str]:
        env = [f"{k}={v}" for k, v in self.env.items()]
        return ["ip", "netns", "exec", node.netns, "env", *env, *argv]

    def run(self, node: Node, *argv: str, timeout: float = 120,
            show_stderr: bool = False) -> subprocess.CompletedProcess[str]:
        """Runs `argv` in `node`'s namespace to its end; RuntimeError with its output if it fails. `show_stderr`:
        its stderr goes to ours as it comes (progress bars), not into the error."""
        done = subprocess.run(self.command(node, *argv), stdout=subprocess.PIPE,
                              stderr=None if show_stderr else subprocess.PIPE, text=True, timeout=timeout,
                              cwd=self.cwd)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {node.netns} failed ({done.returncode}):\n{done.stdout}\n"
                               f"{done.stderr or ''}")
        return done

    def python(self, node: Node, module: str, *args: str, timeout: float = 120, show_stderr: bool = False) -> Any:
        """Runs `python -m module args` in `node`'s namespace; its stdout's last line, read as JSON."""
        done = self.run(node, str(VENV_BIN / "python"), "-m", module, *args, timeout=timeout, show_stderr=show_stderr)
        return json.loads(done.stdout.strip().splitlines()[-1])

    def shape(self, gbit: float, burst_bytes: int, latency_ms: float = 50.0) -> None:
        """Caps every node's link at `gbit` Gbit/s each way: a token-bucket filter (`tbf`) at the root of each node's
        veth end (whatever leaves a node passes it once)."""
        for node in self.nodes:
            ip_tc = ["tc", "qdisc", "replace", "dev", node.dev, "root", "tbf", "rate", f"{gbit:g}gbit",
                     "burst", str(burst_bytes), "latency", f"{latency_ms:g}ms"]
            done = subprocess.run(["ip", "netns", "exec", node.netns, *ip_tc], capture_output=True, text=True,
                                  timeout=30)
            if done.returncode != 0:
                raise RuntimeError(f"`{' '.join(ip_tc)}` in {node.netns} failed: {done.stderr.strip()}")

    def cut(self, port: int) -> None:
        """Connections to tcp `port` fail at once with "No route to host", from either node; nothing else changes."""
        for node in self.nodes:
            ip("-n", node.netns, "rule", "add", "ipproto", "tcp", "dport", str(port), "table", CUT_TABLE,
               "priority", CUT_PRIORITY)
            if not self.cut_table:
                ip("-n", node.netns, "route", "add", "unreachable", "default", "table", CUT_TABLE)
        self.cut_table = True
        self.cut_ports.append(port)

    def mend(self) -> None:
        while self.cut_ports:
            port = self.cut_ports.pop()
            for node in self.nodes:
                ip("-n", node.netns, "rule", "del", "ipproto", "tcp", "dport", str(port), "table", CUT_TABLE,
                   "priority", CUT_PRIORITY)

    def kill_node(self, node: Node) -> list[int]:
        """Loses `node` as a crashed machine would lose it: SIGKILL to every process in its namespace (its raylet,
        its workers, anything they started), at once; the processes killed. The namespace stays, empty."""
        killed = pids(node.netns)
        kill_by_id(killed, grace_s=0.0, first=signal.SIGKILL)
        kill_by_id(pids(node.netns), grace_s=0.0, first=signal.SIGKILL)  # anything forked meanwhile
        return killed


BRIDGE = "br0"


def make_namespaces(nodes: Sequence[Node], switch: str) -> None:
    """A namespace per node and the switch's, whose bridge joins the nodes' veth pairs; nothing in ours."""
    ip("netns", "add", switch)
    ip("-n", switch, "link", "add", BRIDGE, "type", "bridge")
    ip("-n", switch, "link", "set", BRIDGE, "up")
    for node in nodes:
        ip("netns", "add", node.netns)
        ip("-n", node.netns, "link", "add", node.dev, "type", "veth", "peer", "name", node.port, "netns", switch)
        ip("-n", switch, "link", "set", node.port, "master", BRIDGE)
        ip("-n", switch, "link", "set", node.port, "up")
        ip("-n", node.netns, "addr", "add", f"{node.ip}/24", "dev", node.dev)
        ip("-n", node.netns, "link", "set", "lo", "up")
        ip("-n", node.netns, "link", "set", node.dev, "up")


def pids(netns: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=30)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def netns_of(pid: int) -> str:
    """The name of the namespace process `pid` runs in ("" for none of the named ones)."""
    return subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()


def kill_by_id(pids: Sequence[int], grace_s: float = GRACE_S, first: signal.Signals = signal.SIGTERM) -> None:
    """`first` (SIGTERM) to each process, then SIGKILL to those still running after `grace_s` (waited on through
    pidfds)."""
    fds = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds[pid] = os.pidfd_open(pid)
            os.kill(pid, first)
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


def tear_down(nodes: Sequence[Node], switch: str) -> None:
    kill_by_id([pid for node in nodes for pid in pids(node.netns)])
    for node in nodes:
        kill_by_id(pids(node.netns))  # anything started meanwhile (a worker a raylet was spawning)
        with contextlib.suppress(RuntimeError):
            ip("netns", "del", node.netns)
    with contextlib.suppress(RuntimeError):
        ip("netns", "del", switch)


def start_ray(c: Cluster) -> None:
    """The Ray head on the first node, a worker node on each other one that joins it; each offers its CPUs and its
    resources."""
    ray = str(VENV_BIN / "ray")
    for node in c.nodes:
        head = ["--head", f"--port={RAY_PORT}", "--include-dashboard=false"] if node is c.a else \
            [f"--address={c.address}"]
        c.run(node, ray, "start", *head, f"--node-ip-address={node.ip}", f"--num-cpus={node.cpus}",
              f"--resources={json.dumps(node.resources)}",
              f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats")


@contextlib.contextmanager
def cluster_of(nodes: Sequence[Node], cwd: Path | None = None) -> Iterator[Cluster]:
    """The namespaces, the bridge and Ray on every node; all of it gone on exit. `NamespaceError`: no namespaces.
    The cluster's commands run in `cwd`."""
    tmp = Path(tempfile.mkdtemp(prefix="pdmn-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_TMPDIR": str(tmp),
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    switch = nodes[0].netns.replace("A-", "S-", 1)
    try:
        try:
            make_namespaces(nodes, switch)
        except (RuntimeError, OSError) as e:
            raise NamespaceError(f"cannot make the network namespaces of a {len(nodes)}-node cluster (root and "
                                 f"iproute2 needed): {e}") from e
        c = Cluster(tuple(nodes), switch, env, tmp, cwd)
        start_ray(c)
        yield c
    finally:
        tear_down(nodes, switch)
        shutil.rmtree(tmp, ignore_errors=True)


def two_nodes(a: Node, b: Node, cwd: Path | None = None) -> contextlib.AbstractContextManager[Cluster]:
    """`cluster_of` two nodes."""
    return cluster_of((a, b), cwd)


class Background:
    """A long-running command in a node's namespace, and everything it wrote to stdout and stderr."""

    def __init__(self, c: Cluster, node: Node, argv: Sequence[str], name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self.ended = False
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(c.command(node, *argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, cwd=c.cwd)
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
            raise AssertionError(f"{self.name} did not print {text!r} within {timeout:.0f} s "
                                 f"(exit code {self.proc.poll()}); its output:\n{''.join(self.lines)[-8000:]}")
        return line

    def output(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM (the command's own orderly stop), SIGKILL after `grace_s`."""
        if self.proc.poll() is None:
            kill_by_id([self.proc.pid], grace_s=grace_s)  # `ip netns exec` and `env` exec: this is the command
        self.proc.wait(timeout=30)
        self._reader.join(timeout=30)
