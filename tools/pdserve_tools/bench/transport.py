"""Bandwidth of the CPU transports against raw loopback TCP, measured side by side in one invocation.

Two processes: this one receives, a spawned child sends. Every round moves the same `size_bytes` once per variant,
in turn: `raw` (a plain TCP loopback socket, `sendall` into `recv_into`, no framing, no auth), then each transport
(`send` into a posted `expect`, `wait`). A round is timed on the receiver, from the go signal to the last byte
landed; one warm-up round is dropped. Rounds alternate variants so that the machine's noise hits all alike.

Figures: the median GB/s of each variant, and per transport `ratio` = its median / raw's median, plus
`paired_ratio`, the median of the per-round ratios. Payloads are checked by hash after the timed rounds.

As a KV transfer runs inside an engine's worker process:
- `messages`: a round moves `size_bytes` as that many keyed messages, one after the other (a request's layers).
- `busy`: during the transports' rounds, a thread in each process runs Python without pause, as the engine's
  own threads do between their ops. The transports' threads must take the interpreter back after every socket
  call, and wait up to the process's switch interval for it. Raw rounds run without it.
- `switch_intervals_s`: each transport runs once per switch interval (set in both processes for its rounds;
  raw rounds run at Python's default), named `tcp@0.2ms` and so on when there are several.

    pdserve bench transport --size-mb 64 --repeats 15   (or: python -m pdserve_tools.bench.transport ...)
    pdserve bench transport --size-mb 22.5 --messages 30 --busy --switch-interval-ms 5 0.2   (a 512-token prompt's KV)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from kv_transfer import shm, tcp
from kv_transfer.endpoint import Endpoint
from kv_transfer.link import Link, Listener
from kv_transfer.transport import TransportConfig
from pdserve_tools.bench.report import table, write_json
from pdserve_tools.stats import percentile

TRANSPORTS = ("tcp", "shm")
TIMEOUT_S = 30.0
KEY = b"bench"
DEFAULT_SWITCH_INTERVAL_S = 0.005  # Python's


class Spinner:
    """Inside `with spinner:`, a daemon thread runs Python without pause (a stand-in for an engine's threads);
    a spinner made with `enabled=False` does nothing."""

    def __init__(self, enabled: bool) -> None:
        self._on = threading.Event()
        if enabled:
            threading.Thread(target=self._spin, name="bench-spinner", daemon=True).start()

    def __enter__(self) -> None:
        self._on.set()

    def __exit__(self, *exc: object) -> None:
        self._on.clear()

    def _spin(self) -> None:
        total = 0
        while self._on.wait():
            for i in range(1000):
                total += i


def variant_name(transport: str, interval_s: float, several: bool) -> str:
    return f"{transport}@{interval_s * 1e3:g}ms" if several else transport


def parse_variant(name: str) -> tuple[str, float]:
    """(transport, switch interval in seconds) of a variant name; raw and plain names run at Python's default."""
    transport, _, interval = name.partition("@")
    return transport, float(interval.removesuffix("ms")) / 1e3 if interval else DEFAULT_SWITCH_INTERVAL_S


def message_keys(count: int) -> list[bytes]:
    return [KEY + b"-%d" % i for i in range(count)]


def split(view: memoryview, pieces: int) -> list[memoryview]:
    """`view` as `pieces` consecutive views of (nearly) equal size, as a layer's KV blocks reach the transport."""
    step = -(-len(view) // pieces)
    return [view[i : i + step] for i in range(0, len(view), step)]


def _child(ctl: Connection, secret: bytes, addresses: dict[str, object], size: int, pieces: int, messages: int,
           busy: bool) -> None:
    """The sender: connects every transport, then sends on each command (a variant's name, as bytes) until told
    to stop."""
    config = TransportConfig(Endpoint("bench-sender", 0), secret)
    raw = socket.create_connection(addresses["raw"], timeout=TIMEOUT_S)  # type: ignore[arg-type]
    raw.settimeout(None)  # blocking, as a plain socket is: timeout mode would poll before every send
    links: dict[str, Link] = {}
    if "tcp" in addresses:
        links["tcp"] = tcp.connect(addresses["tcp"], config, TIMEOUT_S)  # type: ignore[arg-type]
    if "shm" in addresses:
        links["shm"] = shm.connect(addresses["shm"], config, TIMEOUT_S)  # type: ignore[arg-type]
    src = bytearray(os.urandom(min(size, 1 << 20))) * (size // (1 << 20) + 1)
    view = memoryview(src)[:size]
    bodies = [split(body, pieces) for body in split(view, messages)]
    keys = message_keys(len(bodies))
    spinner = Spinner(busy)
    ctl.send_bytes(hashlib.sha256(view).digest())
    while (cmd := ctl.recv_bytes().decode()) != "stop":
        transport, interval = parse_variant(cmd)
        sys.setswitchinterval(interval)
        if cmd == "raw":
            raw.sendall(view)
            continue
        with spinner:
            for key, views in zip(keys, bodies, strict=True):
                links[transport].send(key, views, TIMEOUT_S)
    for link in links.values():
        link.close()
    raw.close()


def _recv_raw(sock: socket.socket, dst: memoryview) -> None:
    off = 0
    while off < len(dst):
        n = sock.recv_into(dst[off:])
        if n == 0:
            raise ConnectionError("the sender closed the raw socket")
        off += n


def _round(name: str, ctl: Connection, raw: socket.socket, links: dict[str, Link], dst: memoryview, messages: int,
           spinner: Spinner) -> float:
    transport, interval = parse_variant(name)
    sys.setswitchinterval(interval)
    start = time.perf_counter()
    if name == "raw":
        ctl.send_bytes(b"raw")
        _recv_raw(raw, dst)
        return time.perf_counter() - start
    link, keys = links[transport], message_keys(messages)
    for key, part in zip(keys, split(dst, messages), strict=True):
        link.expect(key, [part])
    with spinner:
        ctl.send_bytes(name.encode())
        for key in keys:
            link.wait(key, TIMEOUT_S)
        return time.perf_counter() - start


def _summary(samples: dict[str, list[float]], size: int, repeats: int) -> dict[str, object]:
    raw = percentile(samples["raw"], 50)
    out: dict[str, object] = {"size_bytes": size, "repeats": repeats, "unit": "GB/s", "raw": _stats(samples["raw"])}
    for name, values in samples.items():
        if name != "raw":
            paired = [v / r for v, r in zip(values, samples["raw"], strict=True)]
            out[name] = {
                **_stats(values),
                "ratio": percentile(values, 50) / raw,
                "paired_ratio": percentile(paired, 50),
            }
    return out


def _stats(values: list[float]) -> dict[str, object]:
    return {"median": percentile(values, 50), "min": min(values), "max": max(values), "samples": values}


def measure(transports: Sequence[str] = TRANSPORTS, size_bytes: int = 64 << 20, repeats: int = 5,
            pieces: int = 1, messages: int = 1, busy: bool = False,
            switch_intervals_s: Sequence[float] = (DEFAULT_SWITCH_INTERVAL_S,)) -> dict[str, object]:
    """Median GB/s of raw loopback TCP and of each transport variant, and each variant's ratio to raw. The
    transports get `size_bytes` as `messages` messages, each as `pieces` separate views (raw TCP always sends one
    buffer); see the module docstring for `busy` and `switch_intervals_s`."""
    unknown = set(transports) - set(TRANSPORTS)
    if unknown or size_bytes < 1 or repeats < 1 or not 1 <= messages * pieces <= size_bytes:
        raise ValueError(f"transports from {TRANSPORTS}, size_bytes >= 1, repeats >= 1 and "
                         f"1 <= messages * pieces <= size_bytes; got {transports}, {size_bytes}, {repeats}, "
                         f"{messages} x {pieces}")
    if not switch_intervals_s or not all(0 < s <= 1 for s in switch_intervals_s):
        raise ValueError(f"switch intervals are between 0 and 1 s, got {switch_intervals_s}")
    secret = os.urandom(32)
    config = TransportConfig(Endpoint("bench-receiver", 0), secret)
    raw_listener = socket.create_server(("127.0.0.1", 0))
    raw_listener.settimeout(TIMEOUT_S)
    listeners: dict[str, Any] = {"tcp": tcp.listen(config), "shm": shm.listen(config)}
    addresses: dict[str, object] = {"raw": raw_listener.getsockname()[:2]}
    addresses.update({name: listeners[name].address for name in transports})
    ctx = mp.get_context("spawn")
    ctl, child_ctl = ctx.Pipe()
    child = ctx.Process(target=_child, args=(child_ctl, secret, addresses, size_bytes, pieces, messages, busy),
                        daemon=True)
    child.start()
    several = len(switch_intervals_s) > 1
    variants = [variant_name(t, s, several) for t in transports for s in switch_intervals_s]
    try:
        result = _run(ctl, raw_listener, {n: listeners[n] for n in transports}, size_bytes, repeats, variants,
                      messages, Spinner(busy))
        result.update(messages=messages, pieces=pieces, busy=busy, switch_intervals_s=list(switch_intervals_s))
        return result
    finally:
        for listener in listeners.values():
            listener.close()
        raw_listener.close()
        child.join(TIMEOUT_S)
        if child.is_alive():
            child.kill()
        sys.setswitchinterval(DEFAULT_SWITCH_INTERVAL_S)


def _run(
    ctl: Connection, raw_listener: socket.socket, listeners: dict[str, Listener[Any]], size: int, repeats: int,
    variants: list[str], messages: int, spinner: Spinner,
) -> dict[str, object]:
    raw, _ = raw_listener.accept()
    raw.settimeout(None)
    links = {name: listener.accept(TIMEOUT_S) for name, listener in listeners.items()}
    try:
        if not ctl.poll(TIMEOUT_S):
            raise TimeoutError("the sender did not start")
        digest = ctl.recv_bytes()
        dst = memoryview(bytearray(size))
        samples: dict[str, list[float]] = {name: [] for name in ("raw", *variants)}
        for rnd in range(repeats + 1):
            for name in samples:
                seconds = _round(name, ctl, raw, links, dst, messages, spinner)
                if rnd:  # round 0 warms up pages and caches
                    samples[name].append(size / seconds / 1e9)
                if rnd in (0, repeats) and hashlib.sha256(dst).digest() != digest:
                    raise AssertionError(f"{name}: the bytes that landed differ from the bytes sent")
                dst[:1] = b"\0" if dst[:1] != b"\0" else b"\1"  # so a variant that moved nothing cannot pass
        ctl.send_bytes(b"stop")
    finally:
        for link in links.values():
            link.close()
        raw.close()
    return _summary(samples, size, repeats)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `pdserve bench transport` (and of this module run as a script)."""
    parser.add_argument("--size-mb", type=float, default=64.0)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--pieces", type=int, default=1,
                        help="hand each message to the transport as this many views (a KV layer: one per block)")
    parser.add_argument("--messages", type=int, default=1,
                        help="send each round's bytes as this many messages (a request's KV: one per layer)")
    parser.add_argument("--busy", action="store_true",
                        help="a thread in each process runs Python during the transports' rounds, as an engine's do")
    parser.add_argument("--switch-interval-ms", type=float, nargs="+",
                        default=[DEFAULT_SWITCH_INTERVAL_S * 1e3],
                        help="run each transport at each of these Python switch intervals (default: Python's)")
    parser.add_argument("--transports", nargs="+", default=list(TRANSPORTS), choices=TRANSPORTS)
    parser.add_argument("--out", default="bench-results/transport.json", help="the JSON result")


def main(args: argparse.Namespace) -> int:
    result = measure(args.transports, int(args.size_mb * (1 << 20)), args.repeats, args.pieces, args.messages,
                     args.busy, [ms / 1e3 for ms in args.switch_interval_ms])
    rows: list[list[object]] = [["raw", result["raw"]["median"], "", ""]]  # type: ignore[index]
    for name, entry in result.items():
        if isinstance(entry, dict) and "ratio" in entry:
            rows.append([name, entry["median"], entry["ratio"], entry["paired_ratio"]])
    print(f"{args.size_mb:g} MB as {args.messages} message(s) of {args.pieces} piece(s) x {args.repeats} rounds"
          f"{', a busy Python thread in each process' if args.busy else ''}; receiver-side median GB/s")
    print(table(["variant", "GB/s", "ratio", "paired_ratio"], rows))
    print(json.dumps(result))
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(cli)
    sys.exit(main(cli.parse_args()))
