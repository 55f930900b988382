"""The `pdserve` command: serve, generate, demo, model prepare, bench, sim, calibrate, chaos, predictor."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from pdserve.config import load_config


def _serve(args: argparse.Namespace) -> int:
    from pdserve.cluster import deploy

    config = load_config(args.config)

    async def run() -> None:
        deployment = await deploy(config)
        host = config.router.host
        print(f"pdserve serving gRPC on {host}:{deployment.port}, OpenAI-compatible HTTP on "
              f"http://{host}:{deployment.http_port}/v1, metrics on http://{host}:{deployment.metrics_port}/metrics",
              flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await deployment.stop()

    asyncio.run(run())
    return 0


def _generate(args: argparse.Namespace) -> int:
    from pdserve_client import Client, PdserveError

    prompt: object = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    with Client(args.target) as client:
        try:
            final = None
            for chunk in client.generate(
                prompt, max_tokens=args.max_tokens, temperature=args.temperature, timeout=args.timeout  # type: ignore[arg-type]
            ):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                final = chunk.final or final
        except PdserveError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            return 1
    if final is not None:
        t = final.timings
        print(
            f"\n[{final.completion_tokens} tokens, {final.finish_reason}, TTFT {t.time_to_first_token * 1000:.0f} ms,"
            f" TPOT {final.time_per_output_token * 1000:.1f} ms]",
            file=sys.stderr,
        )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pdserve.demo import main

    return main(load_config(args.config))


def _model_prepare(args: argparse.Namespace) -> int:
    from pdserve.models import prepare_smollm2

    print(prepare_smollm2())
    return 0


def _bench_overhead(args: argparse.Namespace) -> int:
    from pdserve.bench.overhead import main

    return main(args)


def _bench_transport(args: argparse.Namespace) -> int:
    from pdserve.bench.transport import main

    return main(["--size-mb", str(args.size_mb), "--repeats", str(args.repeats), "--pieces", str(args.pieces),
                 "--json", args.out])


def _bench_transfer(args: argparse.Namespace) -> int:
    from pdserve.bench.transfer import main

    return main(args)


def _bench_serve(args: argparse.Namespace) -> int:
    from pdserve.bench.serve import main

    return main(args)


def _bench_overload(args: argparse.Namespace) -> int:
    from pdserve.bench.overload import main

    return main(args)


def _sim(args: argparse.Namespace) -> int:
    from pdserve.sim.command import main

    return main(args)


def _calibrate(args: argparse.Namespace) -> int:
    from pdserve.sim.calibrate import main

    return main(args)


def _chaos(args: argparse.Namespace) -> int:
    from pdserve.chaos_command import main

    return main(args)


def _predictor_label(args: argparse.Namespace) -> int:
    from pdserve.predictor.label import main

    return main(args)


def _predictor_train(args: argparse.Namespace) -> int:
    from pdserve.predictor.train import main

    return main(args)


def _predictor_eval(args: argparse.Namespace) -> int:
    from pdserve.predictor.evaluate import main

    return main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the cluster and its gRPC frontend until interrupted")
    p.add_argument("--config", help="YAML file; default: the embedded default (local Ray, CPU, SmolLM2)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("generate", help="stream one generation from a running server")
    p.add_argument("prompt")
    p.add_argument("--target", default="localhost:50051")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--raw", dest="chat", action="store_false", help="send the prompt as raw text, not a chat")
    p.set_defaults(func=_generate)

    p = sub.add_parser("demo", help="start a local cluster, stream a few answers with timings, stop")
    p.add_argument("--config")
    p.set_defaults(func=_demo)

    p = sub.add_parser("model", help="model folders")
    msub = p.add_subparsers(dest="model_command", required=True)
    m = msub.add_parser("prepare", help="convert the bundled SmolLM2-135M-Instruct GGUF into a model folder")
    m.set_defaults(func=_model_prepare)

    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    b = bsub.add_parser("overhead", help="frontend+router+channel overhead per request vs the engine in-process")
    b.add_argument("--requests", type=int, default=100)
    b.add_argument("--max-tokens", type=int, default=8)
    b.add_argument("--model", default=None, help="model folder; default: the embedded default model")
    b.add_argument("--out", default="bench-results/overhead.json")
    b.set_defaults(func=_bench_overhead)
    b = bsub.add_parser("transport", help="CPU KV transports (tcp, shm) against raw loopback TCP, side by side")
    b.add_argument("--size-mb", type=float, default=64.0)
    b.add_argument("--repeats", type=int, default=15)
    b.add_argument("--pieces", type=int, default=1, help="each message as this many views (a KV layer: one per block)")
    b.add_argument("--out", default="bench-results/transport.json")
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
    p = sub.add_parser("sim", help="simulate every decode policy at several cluster sizes: goodput under SLO, "
                       "preemptions, TPOT p99")
    from pdserve.sim.command import add_arguments as add_sim

    add_sim(p)
    p.set_defaults(func=_sim)
    p = sub.add_parser("calibrate", help="fit the simulator's cost model to step times measured on a vLLM engine "
                       "on CPU; writes the cost file `pdserve sim --cost` reads")
    from pdserve.sim.calibrate import add_arguments as add_calibrate

    add_calibrate(p)
    p.set_defaults(func=_calibrate)
    from pdserve.bench.overload import add_parser as add_overload
    from pdserve.bench.serve import add_parser
    from pdserve.chaos_command import add_parser as add_chaos
    from pdserve.predictor.commands import add_parsers as add_predictor

    add_parser(bsub, _bench_serve)
    add_overload(bsub, _bench_overload)
    add_chaos(sub, _chaos)
    add_predictor(sub, _predictor_label, _predictor_train, _predictor_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
