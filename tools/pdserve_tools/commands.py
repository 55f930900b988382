"""The `pdserve` sub-commands this distribution adds (entry-point group `pdserve.commands`): bench, sim,
calibrate, plan, chaos and predictor. Each command's module is imported only when the command runs."""

from __future__ import annotations

import argparse
from typing import Any

from pdserve_tools.bench.external import add_parser as add_external
from pdserve_tools.bench.goodput import add_parser as add_goodput
from pdserve_tools.bench.overload import add_parser as add_overload
from pdserve_tools.bench.prefill import add_parser as add_prefill
from pdserve_tools.bench.serve import add_parser
from pdserve_tools.bench.transport import add_arguments as add_transport
from pdserve_tools.chaos_command import add_parser as add_chaos
from pdserve_tools.predictor.commands import add_parsers as add_predictor
from pdserve_tools.sim.calibrate import add_arguments as add_calibrate
from pdserve_tools.sim.command import add_arguments as add_sim
from pdserve_tools.sim.plan_command import add_arguments as add_plan


def _bench_overhead(args: argparse.Namespace) -> int:
    from pdserve_tools.bench.overhead import main

    return main(args)


def _bench_transport(args: argparse.Namespace) -> int:
    from pdserve_tools.bench.transport import main

    return main(args)


def _bench_transfer(args: argparse.Namespace) -> int:
    from pdserve_tools.bench.transfer import main

    return main(args)


def _bench_multinode(args: argparse.Namespace) -> int:
    from pdserve_tools.bench.multinode import main

    return main(args)


def _bench_serve(args: argparse.Namespace) -> int:
    from pdserve_tools.bench.serve import main

    return main(args)


def _bench_goodput(args: argparse.Namespace) -> int:
    from pdserve_tools.bench.goodput import main

    return main(args)


def _bench_overload(args: argparse.Namespace) -> int:
    from pdserve_tools.bench.overload import main

    return main(args)


def _bench_prefill(args: argparse.Namespace) -> int:
    from pdserve_tools.bench.prefill import main

    return main(args)


def _bench_external(args: argparse.Namespace) -> int:
    from pdserve_tools.bench.external import main

    return main(args)


def _sim(args: argparse.Namespace) -> int:
    from pdserve_tools.sim.command import main

    return main(args)


def _plan(args: argparse.Namespace) -> int:
    from pdserve_tools.sim.plan_command import main

    return main(args)


def _calibrate(args: argparse.Namespace) -> int:
    from pdserve_tools.sim.calibrate import main

    return main(args)


def _chaos(args: argparse.Namespace) -> int:
    from pdserve_tools.chaos_command import main

    return main(args)


def _predictor_label(args: argparse.Namespace) -> int:
    from pdserve_tools.predictor.label import main

    return main(args)


def _predictor_train(args: argparse.Namespace) -> int:
    from pdserve_tools.predictor.train import main

    return main(args)


def _predictor_eval(args: argparse.Namespace) -> int:
    from pdserve_tools.predictor.evaluate import main

    return main(args)


def add_commands(sub: Any) -> None:
    """Adds the tools' commands to the `pdserve` parser's sub-parsers."""
    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    b = bsub.add_parser("overhead", help="frontend+router+channel overhead per request vs the engine in-process")
    b.add_argument("--requests", type=int, default=100)
    b.add_argument("--max-tokens", type=int, default=8)
    b.add_argument("--model", default=None, help="model folder; default: the embedded default model")
    b.add_argument("--out", default="bench-results/overhead.json")
    b.set_defaults(func=_bench_overhead)
    b = bsub.add_parser("transport", help="CPU KV transports (tcp, shm) against raw loopback TCP, side by side")
    add_transport(b)
    b.set_defaults(func=_bench_transport)
    b = bsub.add_parser("transfer", help="KV transfer of real requests (1P1D) against raw loopback bandwidth, "
                        "and the transfer time layer-wise streaming hides")
    b.add_argument("--config", help="a serve config (default: the embedded one); its engine and transfer sections")
    b.add_argument("--model", help="model folder or name (default: the config's)")
    b.add_argument("--prompt-tokens", type=int, default=1024)
    b.add_argument("--requests", type=int, default=8, help="requests per mode (layer-wise on, off)")
    b.add_argument("--raw-repeats", type=int, default=15)
    b.add_argument("--out", default="bench-results/transfer.json")
    b.set_defaults(func=_bench_transfer)
    b = bsub.add_parser("multinode", help="1P1D across two nodes (network namespaces) at several link speeds against "
                        "one node: KV throughput vs raw TCP, exposed transfer, TTFT/TPOT ratios, transfer failures")
    b.add_argument("--config", help="a serve config whose engine and transfer sections to use (default: the "
                   "embedded one with a tiny random model)")
    b.add_argument("--model", help="model folder or name (default: a tiny random Llama, or the --config's model)")
    b.add_argument("--links", type=float, nargs="*", default=[1.0, 10.0],
                   help="tbf link speeds in Gbit/s, run after the unshaped link")
    b.add_argument("--prompt-tokens", type=int, default=1024)
    b.add_argument("--requests", type=int, default=5, help="transfers and requests per deployment (after a warm-up)")
    b.add_argument("--max-tokens", type=int, default=16, help="tokens per request (EOS ignored)")
    b.add_argument("--raw-repeats", type=int, default=5, help="raw TCP sends per link")
    b.add_argument("--burst-kb", type=int, default=256, help="the tbf bucket (KiB)")
    b.add_argument("--log-dir", default="bench-results/multinode-logs", help="each deployment's config and log")
    b.add_argument("--out", default="bench-results/multinode.json")
    b.set_defaults(func=_bench_multinode)
    p = sub.add_parser("sim", help="simulate every decode policy at several cluster sizes: goodput under SLO, "
                       "preemptions, TPOT p99")
    add_sim(p)
    p.set_defaults(func=_sim)
    p = sub.add_parser("calibrate", help="fit the simulator's cost model to step times measured on a vLLM engine "
                       "on CPU; writes the cost file `pdserve sim --cost` reads")
    add_calibrate(p)
    p.set_defaults(func=_calibrate)
    p = sub.add_parser("plan", help="how many of a budget of instances should prefill and how many decode: the cost "
                       "model's estimate, checked and refined in the simulator")
    add_plan(p)
    p.set_defaults(func=_plan)

    add_parser(bsub, _bench_serve)
    add_goodput(bsub, _bench_goodput)
    add_overload(bsub, _bench_overload)
    add_external(bsub, _bench_external)
    add_prefill(bsub, _bench_prefill)
    add_chaos(sub, _chaos)
    add_predictor(sub, _predictor_label, _predictor_train, _predictor_eval)
