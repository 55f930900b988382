"""Bandwidth of the CPU transports against raw loopback TCP, measured side by side in one invocation.

Two processes: this one receives, a spawned child sends. Every round moves the same `size_bytes` once per variant,
in turn: `raw` (a plain TCP loopback socket, `sendall` into `recv_into`, no framing, no auth), then each transport
(`send` into a posted `expect`, `wait`). A round is timed on the receiver, from the go signal to the last byte
landed; one warm-up round is dropped. Rounds alternate variants so that the machine's noise hits all alike.

Figures: the median GB/s of each variant, and per transport `ratio` = its median / raw's median, plus
`paired_ratio`, the median of the per-round ratios. Payloads are checked by hash after the timed rounds.

    pdserve bench transport --size-mb 64 --repeats 15   (or: python -m pdserve_tools.bench.transport ...)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import socket
import sys
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


def split(view: memoryview, pieces: int) -> list[memoryview]:
    """`view` as `pieces` consecutive views of (nearly) equal size, as a layer's KV blocks reach the transport."""
    step = -(-len(view) // pieces)
    return [view[i : i + step] for i in range(0, len(view), step)]


def _child(ctl: Connection, secret: bytes, addresses: dict[str, object], size: int, pieces: int) -> None:
    """The sender: connects every variant, then sends on each command until told to stop (commands are bytes)."""
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
    views = split(view, pieces)
    ctl.send_bytes(hashlib.sha256(view).digest())
    while (cmd := ctl.recv_bytes().decode()) != "stop":
        if cmd == "raw":
            raw.sendall(view)
        else:
            links[cmd].send(KEY, views, TIMEOUT_S)
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


def _round(name: str, ctl: Connection, raw: socket.socket, links: dict[str, Link], dst: memoryview) -> float:
    start = time.perf_counter()
    if name == "raw":
        ctl.send_bytes(b"raw")
        _recv_raw(raw, dst)
    else:
        links[name].expect(KEY, [dst])
        ctl.send_bytes(name.encode())
        links[name].wait(KEY, TIMEOUT_S)
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
            pieces: int = 1) -> dict[str, object]:
    """Median GB/s of raw loopback TCP and of each transport, and each transport's ratio to raw. The transports
    get each message as `pieces` separate views (raw TCP always sends one buffer)."""
    unknown = set(transports) - set(TRANSPORTS)
    if unknown or size_bytes < 1 or repeats < 1 or not 1 <= pieces <= size_bytes:
        raise ValueError(f"transports from {TRANSPORTS}, size_bytes >= 1, repeats >= 1 and 1 <= pieces <= size_bytes; "
                         f"got {transports}, {size_bytes}, {repeats}, {pieces}")
    secret = os.urandom(32)
    config = TransportConfig(Endpoint("bench-receiver", 0), secret)
    raw_listener = socket.create_server(("127.0.0.1", 0))
    raw_listener.settimeout(TIMEOUT_S)
    listeners: dict[str, Any] = {"tcp": tcp.listen(config), "shm": shm.listen(config)}
    addresses: dict[str, object] = {"raw": raw_listener.getsockname()[:2]}
    addresses.update({name: listeners[name].address for name in transports})
    ctx = mp.get_context("spawn")
    ctl, child_ctl = ctx.Pipe()
    child = ctx.Process(target=_child, args=(child_ctl, secret, addresses, size_bytes, pieces), daemon=True)
    child.start()
    try:
        return _run(ctl, raw_listener, {n: listeners[n] for n in transports}, size_bytes, repeats)
    finally:
        for listener in listeners.values():
            listener.close()
        raw_listener.close()
        child.join(TIMEOUT_S)
        if child.is_alive():
            child.kill()


def _run(
    ctl: Connection, raw_listener: socket.socket, listeners: dict[str, Listener[Any]], size: int, repeats: int
) -> dict[str, object]:
    raw, _ = raw_listener.accept()
    raw.settimeout(None)
    links = {name: listener.accept(TIMEOUT_S) for name, listener in listeners.items()}
    try:
        if not ctl.poll(TIMEOUT_S):
            raise TimeoutError("the sender did not start")
        digest = ctl.recv_bytes()
        dst = memoryview(bytearray(size))
        samples: dict[str, list[float]] = {name: [] for name in ("raw", *links)}
        for rnd in range(repeats + 1):
            for name in samples:
                seconds = _round(name, ctl, raw, links, dst)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=64.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pieces", type=int, default=1,
                        help="hand each message to the transport as this many views (a KV layer: one per block)")
    parser.add_argument("--transports", nargs="+", default=list(TRANSPORTS), choices=TRANSPORTS)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    result = measure(args.transports, int(args.size_mb * (1 << 20)), args.repeats, args.pieces)
    rows: list[list[object]] = [["raw", result["raw"]["median"], "", ""]]  # type: ignore[index]
    for name in args.transports:
        entry = result[name]
        rows.append([name, entry["median"], entry["ratio"], entry["paired_ratio"]])  # type: ignore[index]
    print(f"{args.size_mb:g} MB in {args.pieces} piece(s) x {args.repeats} rounds, receiver-side median GB/s")
    print(table(["variant", "GB/s", "ratio", "paired_ratio"], rows))
    print(json.dumps(result))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
