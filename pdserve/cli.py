"""The `pdserve` command: serve, generate, demo, model prepare, config docs.

Other distributions add commands through the entry-point group `pdserve.commands`: a callable that takes the
sub-parsers and adds its own. `pdserve-tools` adds bench, sim, calibrate, chaos and predictor that way, so the
runtime never imports the tools.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from importlib.metadata import entry_points

from pdserve.config import load_config

PLUGIN_GROUP = "pdserve.commands"


def _serve(args: argparse.Namespace) -> int:
    from pdserve.cluster import deploy

    config = load_config(args.config)

    async def run() -> None:
        deployment = await deploy(config)
        host = config.router.host
        print(f"pdserve serving gRPC on {host}:{deployment.port}, OpenAI-compatible HTTP on "
              f"http://{host}:{deployment.http_port}/v1, metrics on "
              f"http://{config.router.metrics_host}:{deployment.metrics_port}/metrics",
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
    from pdserve_client import Client, PdserveError, Tls

    prompt: object = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    token = None
    if args.token_env is not None:
        token = os.environ.get(args.token_env)
        if not token:
            print(f"error: --token-env {args.token_env}: that environment variable is not set", file=sys.stderr)
            return 2
    tls = None
    if args.ca_file is not None or args.server_name is not None:
        try:
            tls = Tls.from_files(root_ca=args.ca_file, server_name=args.server_name)
        except OSError as e:
            print(f"error: --ca-file {args.ca_file}: {e.strerror}", file=sys.stderr)
            return 2
    with Client(args.target, token=token, tls=tls) as client:
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


def _config_docs(args: argparse.Namespace) -> int:
    from pdserve.config_docs import render

    text = render()
    if args.out == "-":
        sys.stdout.write(text)
    else:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


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
    p.add_argument("--token-env", metavar="NAME", help="send the bearer token held in this environment variable")
    p.add_argument("--ca-file", metavar="PEM",
                   help="TLS: verify the server against this CA certificate (or the server's own, self-signed)")
    p.add_argument("--server-name", metavar="NAME",
                   help="TLS: the name the server's certificate must carry, when the target is another name or an "
                        "address (a port-forward to localhost); implies TLS with the system's roots unless --ca-file")
    p.set_defaults(func=_generate)

    p = sub.add_parser("demo", help="start a local cluster, stream a few answers with timings, stop")
    p.add_argument("--config")
    p.set_defaults(func=_demo)

    p = sub.add_parser("model", help="model folders")
    msub = p.add_subparsers(dest="model_command", required=True)
    m = msub.add_parser("prepare", help="convert the bundled SmolLM2-135M-Instruct GGUF into a model folder")
    m.set_defaults(func=_model_prepare)

    p = sub.add_parser("config", help="the configuration's reference")
    csub = p.add_subparsers(dest="config_command", required=True)
    c = csub.add_parser("docs", help="write docs/configuration.md from the config dataclasses")
    c.add_argument("--out", default="docs/configuration.md", help="the file to write; - for standard output")
    c.set_defaults(func=_config_docs)

    for plugin in entry_points(group=PLUGIN_GROUP):  # `pdserve-tools`: bench, sim, calibrate, chaos, predictor
        try:
            add_commands = plugin.load()
        except Exception as e:  # a broken plugin must not take `pdserve serve` down with it
            print(f"pdserve: the commands of {plugin.value} are unavailable: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
