"""`pdserve bench multinode`: pdserve 1P1D across two nodes at several link speeds, against 1P1D on one node.

The two nodes are network namespaces of this machine joined by a veth pair (`pdserve_tools.netns`); a link speed
is a `tbf` qdisc on both ends of the pair (`--links`, Gbit/s; the unshaped link always runs first). For each link
the run starts a fresh two-node Ray cluster and, in it:

1. (first link only) the one-node baseline: `pdserve serve` in node A with both pools on node A (KV through
   shared memory, as `transport: auto` picks between workers of one node);
2. `pdserve serve` in node A with the prefill pool on node A and the decode pool on node B (KV over the link);
   the probe (`multinode_probe`), run in node A, checks each worker's namespace, drives transfers directly and
   requests through the router, and reads the router's /metrics;
3. the raw TCP throughput of the same link (`rawlink`): a plain socket send from A to B of the size of one
   request's KV (the median; 64 KiB at least), `--raw-repeats` times, once while that deployment is still up
   (idle after its probe: the KV path's neighbours on these cores) and once after it has stopped.

Then the cluster is torn down by process id (even when a step failed). The figures (`multinode_report`) go to
`--out` as JSON and to stdout as tables; progress goes to stderr, each deployment's log to `--log-dir`.

    pdserve bench multinode [--model PATH] [--links 1 10] [--prompt-tokens 1024] [--requests 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from pdserve.config import EngineConfig, load_config
from pdserve_tools.bench.multinode_report import Measured, link_name, render, summarize
from pdserve_tools.bench.pdserve_server import SERVING
from pdserve_tools.bench.peers import STARTUP_TIMEOUT_S
from pdserve_tools.bench.report import write_json
from pdserve_tools.bench.transfer import Sample
from pdserve_tools.netns import VENV_BIN, Background, Cluster, netns_of, node_pair, two_nodes
from pdserve_tools.stats import percentile

RAW_PORT = 6390
PROBE_TIMEOUT_S = 3600.0
MIN_RAW_BYTES = 64 << 10
RESOURCES = ("pdserve-node-a", "pdserve-node-b")  # one per node: a pool asks for one to land there


@dataclasses.dataclass(frozen=True)
class Settings:
    engine: EngineConfig
    transfer: dict[str, Any]  # the transfer section of every deployment
    prompt_tokens: int
    requests: int
    max_tokens: int
    raw_repeats: int
    burst_bytes: int
    log_dir: Path


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def serve_config(c: Cluster, s: Settings, across: bool, namespace: str) -> dict[str, Any]:
    """1P1D with the prefill pool on node A and the decode pool on node B (`across`) or on node A too."""
    decode_node = c.b if across else c.a
    return {
        "ray": {"address": c.address, "namespace": namespace, "log_to_driver": False},
        "engine": dataclasses.asdict(s.engine),
        "workers": {
            "mode": "disaggregated",
            "bind_threads": False,  # the nodes' CPUs are this machine's cores, whoever's they are: nothing to lay out
            "prefill": {"instances": 1, "cpus": 1, "resources": {c.a.resource: 1}},
            "decode": {"instances": 1, "cpus": 1, "resources": {decode_node.resource: 1}},
        },
        "transfer": s.transfer,
        "router": {"host": "127.0.0.1", "port": 0, "http_port": 0, "metrics_port": 0,
                   "max_tokens_limit": max(s.max_tokens, 16)},
    }


def deployment(c: Cluster, s: Settings, across: bool, gbit: float | None) -> Measured:
    """One deployment served, probed and stopped; its records, with (across nodes) the raw sends made beside it
    (those after it are not yet measured)."""
    layout = "across" if across else "one-node"
    namespace = f"pdserve-bench-{layout}"
    name = f"{layout}-{'unshaped' if gbit is None else f'{gbit:g}gbit'}"
    s.log_dir.mkdir(parents=True, exist_ok=True)
    config, log = s.log_dir / f"{name}.yaml", s.log_dir / f"{name}.log"
    config.write_text(yaml.safe_dump(serve_config(c, s, across, namespace)))
    say(f"{layout}, {link_name(gbit)}: starting pdserve serve (log: {log})")
    served = Background(c, c.a, [str(VENV_BIN / "pdserve"), "serve", "--config", str(config)], "pdserve serve")
    try:
        found = SERVING.search(served.wait_for("pdserve serving gRPC on", STARTUP_TIMEOUT_S))
        if found is None:
            raise RuntimeError(f"pdserve serve's ready line is not what {SERVING.pattern!r} reads")
        target, _, metrics_url = found.groups()
        say(f"{layout}, {link_name(gbit)}: serving; probing ({s.requests} transfers, {s.requests} requests)")
        report = c.python(c.a, "pdserve_tools.bench.multinode_probe", "--address", c.address, "--namespace",
                          namespace, "--target", target, "--metrics-url", metrics_url, "--prompt-tokens",
                          str(s.prompt_tokens), "--requests", str(s.requests), "--max-tokens", str(s.max_tokens),
                          timeout=PROBE_TIMEOUT_S, show_stderr=True)
        check_placement(c, report["instances"], across)
        samples = [Sample(**{**d, "send_seconds": tuple(d["send_seconds"])}) for d in report["samples"]]
        raw_bytes, beside = 0, tuple[float, ...]()
        if across:
            raw_bytes = raw_size(samples)
            say(f"{link_name(gbit)}: raw TCP beside the deployment, {s.raw_repeats} sends of {raw_bytes / 1e6:.1f} MB")
            beside = tuple(raw_link(c, raw_bytes, s.raw_repeats))
    finally:
        served.stop()
        log.write_text(served.output())
    return Measured(gbit, samples, report["served"], report["metrics"], report["metrics_before"],
                    raw_bytes=raw_bytes, raw_beside_seconds=beside)


def raw_size(samples: list[Sample]) -> int:
    """Bytes per raw send: one request's KV (the median), at least `MIN_RAW_BYTES`."""
    return max(MIN_RAW_BYTES, int(percentile([float(x.bytes) for x in samples], 50)))


def check_placement(c: Cluster, instances: list[dict[str, Any]], across: bool) -> None:
    """The prefill worker runs in node A's namespace, the decode worker in B's (`across`) or A's."""
    want = {"prefill": c.a.netns, "decode": c.b.netns if across else c.a.netns}
    for i in instances:
        where = netns_of(int(i["pid"]))
        if where != want[i["role"]]:
            raise RuntimeError(f"{i['instance_id']} runs in namespace {where!r}, not {want[i['role']]!r}: the pools' "
                               "resources did not place it")


def raw_link(c: Cluster, size: int, repeats: int) -> list[float]:
    """Seconds each of `repeats` plain socket sends of `size` bytes from node A to node B took to land."""
    module = [str(VENV_BIN / "python"), "-m", "pdserve_tools.bench.rawlink"]
    args = ["--host", c.b.ip, "--port", str(RAW_PORT), "--size", str(size), "--repeats", str(repeats)]
    receiver = Background(c, c.b, [*module, "recv", *args], "the raw receiver")
    try:
        receiver.wait_for("ready", 60)
        seconds: list[float] = c.python(c.a, "pdserve_tools.bench.rawlink", "send", *args, timeout=600)["seconds"]
    finally:
        receiver.stop(grace_s=5.0)
    return seconds


def one_link(s: Settings, gbit: float | None) -> tuple[Measured, Measured]:
    """A fresh two-node cluster with its link shaped to `gbit`: the one-node baseline and the across-nodes
    deployment, one after the other (the machine's load drifts: each link's ratios are to its own baseline), then
    the raw sends once it has stopped."""
    a, b = node_pair(secrets.token_hex(3), RESOURCES, cpus=(2, 1), prefix="pdbm")  # A hosts both pools alone
    say(f"{link_name(gbit)}: starting a two-node cluster ({a.netns}, {b.netns})")
    with two_nodes(a, b) as c:
        if gbit is not None:
            c.shape(gbit, s.burst_bytes)
        one = deployment(c, s, across=False, gbit=gbit)
        across = deployment(c, s, across=True, gbit=gbit)
        say(f"{link_name(gbit)}: raw TCP, {s.raw_repeats} sends of {across.raw_bytes / 1e6:.1f} MB")
        seconds = raw_link(c, across.raw_bytes, s.raw_repeats)
    say(f"{link_name(gbit)}: done; cluster torn down")
    return one, dataclasses.replace(across, raw_seconds=tuple(seconds))


def settings(args: argparse.Namespace) -> Settings:
    base = load_config(args.config)
    if args.model:
        model = args.model
    elif args.config:
        model = base.engine.model
    else:
        from pdserve.models import cache_dir
        from pdserve_tools.tiny_model import make_tiny_llama

        model = str(make_tiny_llama(cache_dir() / "models" / "tiny-llama-bench"))
    engine = dataclasses.replace(base.engine, model=model)
    if args.prompt_tokens + args.max_tokens >= engine.max_model_len:
        raise SystemExit(f"--prompt-tokens + --max-tokens must stay below max_model_len ({engine.max_model_len})")
    if args.requests < 1 or args.max_tokens < 2 or args.raw_repeats < 1 or any(g <= 0 for g in args.links):
        raise SystemExit("--requests and --raw-repeats must be >= 1, --max-tokens >= 2, every --links speed > 0")
    return Settings(engine, dataclasses.asdict(base.transfer), args.prompt_tokens, args.requests, args.max_tokens,
                    args.raw_repeats, args.burst_kb * 1024, Path(args.log_dir))


def main(args: argparse.Namespace) -> int:
    s = settings(args)
    links: list[float | None] = [None, *args.links]
    started = time.monotonic()
    baselines, measured = [], []
    for i, gbit in enumerate(links):
        say(f"link {i + 1} of {len(links)}: {link_name(gbit)}")
        one, across = one_link(s, gbit)
        baselines.append(one)
        measured.append(across)
    result = summarize(baselines, measured, {
        "model": s.engine.model, "prompt_tokens": s.prompt_tokens, "requests": s.requests,
        "max_tokens": s.max_tokens, "raw_repeats": s.raw_repeats, "tbf_burst_bytes": s.burst_bytes,
        "tbf_latency_ms": 50, "transfer": s.transfer, "wall_s": round(time.monotonic() - started, 1)})
    print(f"\n1P1D, {s.prompt_tokens} prompt tokens, {s.requests} requests per deployment, {s.max_tokens} tokens "
          f"each; KV per request {(result['one_node']['kv_bytes_per_request'] or 0) / 1e6:.2f} MB")
    print(render(result))
    print(f"wrote {write_json(args.out, result)}")
    return 0

