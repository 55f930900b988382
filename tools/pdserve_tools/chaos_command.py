"""The `pdserve chaos` command: starts a deployment, runs `pdserve_tools.chaos.run_chaos` on it, prints and saves
the count.

Without `--config` the deployment is `--layout` (1P1D, the embedded default's shape, or 1P2D) of a tiny random
Llama (made at first use under the cache folder, as the overhead benchmark does) over tcp; with it, the file's
engine, workers and transfer sections. Either way the ports are free ones and `transfer.fault_every` is
`--fault-every` (0 turns injected transfer faults off).

    pdserve chaos [--layout 1p1d] [--requests 1000] [--concurrency 16] [--kill-every-s 60] [--fault-every 10]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from typing import Any

from pdserve.config import ServeConfig, config_from_dict, load_config

LAYOUTS = {
    "1p1d": {"mode": "disaggregated", "prefill": {"instances": 1}, "decode": {"instances": 1}},
    "1p2d": {"mode": "disaggregated", "prefill": {"instances": 1}, "decode": {"instances": 2}},
}
TINY_ENGINE = {"max_model_len": 1024, "max_num_seqs": 16, "max_num_batched_tokens": 1024, "kv_cache_gib": 0.25}


def deployment_config(config_path: str | None, transfer: dict[str, Any], router: dict[str, Any],
                      layout: str = "1p1d") -> ServeConfig:
    """A config with free ports: the file's sections when one is given, else `layout` (a key of `LAYOUTS`) of the
    tiny model; `transfer` and `router` override single fields."""
    from pdserve.models import cache_dir
    from pdserve_tools.tiny_model import make_tiny_llama

    if config_path is not None:
        base = load_config(config_path)
        engine: dict[str, Any] = dataclasses.asdict(base.engine)
        workers: dict[str, Any] = dataclasses.asdict(base.workers)
        transfer = {**dataclasses.asdict(base.transfer), **transfer}
    else:
        engine = {"model": str(make_tiny_llama(cache_dir() / "models" / "tiny-llama-bench")), **TINY_ENGINE}
        workers = LAYOUTS[layout]
        transfer = {"transport": "tcp", **transfer}
    return config_from_dict(
        {
            "ray": {"num_cpus": max(8, os.cpu_count() or 2), "log_to_driver": False},
            "engine": engine,
            "workers": workers,
            "transfer": transfer,
            "router": {"port": 0, "http_port": 0, "metrics_port": 0, "policy": "round_robin", **router},
        }
    )


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pdserve.cluster import deploy
    from pdserve_tools.bench.report import table, write_json
    from pdserve_tools.chaos import ChaosConfig, run_chaos

    chaos = ChaosConfig(
        requests=args.requests,
        concurrency=args.concurrency,
        cancel_fraction=args.cancel_fraction,
        kill_every_s=args.kill_every_s,
        deadline_s=args.deadline_s,
        seed=args.seed,
    )
    # A stalled transfer costs its request the transfer deadline: short here, so injected stalls end soon.
    config = deployment_config(
        args.config,
        {"fault_every": args.fault_every, "deadline_s": args.transfer_deadline_s},
        {"max_tokens_limit": 512},
        args.layout,
    )

    async def run() -> Any:
        dep = await deploy(config)
        try:
            with tqdm(total=chaos.requests, desc="chaos", file=sys.stderr) as bar:
                return await run_chaos(dep, chaos, lambda _: bar.update())
        finally:
            await dep.stop()

    report = asyncio.run(run())
    layout = "--config's layout" if args.config else args.layout.upper()
    print(
        f"\n{layout}: {chaos.requests} requests, {chaos.concurrency} at a time, {chaos.cancel_fraction:.0%} "
        f"cancelled, a worker killed once the first request ended and then every {chaos.kill_every_s:g} s, every "
        f"{args.fault_every}th transfer faulted"
    )
    print(table(["", "count"], report.rows()))
    print(f"wrote {write_json(args.out, report.to_json())}")
    return 0 if report.tally.lost == 0 and report.held.total == 0 else 1


def add_parser(sub: Any, func: Any) -> None:
    p = sub.add_parser(
        "chaos",
        help="load a deployment while killing workers and faulting transfers; count lost requests and leaked KV",
    )
    p.add_argument(
        "--config",
        help="a serve config whose engine, workers and transfer sections to use (default: --layout of a tiny model)",
    )
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="1p1d",
                   help="without --config: 1p1d (the embedded default's shape) or 1p2d")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--cancel-fraction", type=float, default=0.25)
    p.add_argument("--kill-every-s", type=float, default=60.0, help="0: kill no worker")
    p.add_argument("--fault-every", type=int, default=10, help="every n-th KV transfer fails on purpose; 0: none")
    p.add_argument("--transfer-deadline-s", type=float, default=5.0)
    p.add_argument("--deadline-s", type=float, default=3600.0, help="requests not ended by then are lost")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results/chaos.json")
    p.set_defaults(func=func)
