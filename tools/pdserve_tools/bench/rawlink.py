"""Raw TCP throughput of one link: a plain socket send of `size` bytes, timed until the receiver has all of it.

Run as two processes, one per end (`pdserve bench multinode` starts them in the two nodes' namespaces):

    python -m pdserve_tools.bench.rawlink recv --host 10.213.0.2 --port 6390 --size N --repeats K
    python -m pdserve_tools.bench.rawlink send --host 10.213.0.2 --port 6390 --size N --repeats K

The receiver prints `ready` once it listens, takes one connection and, `repeats` times, reads `size` bytes and
answers one byte. The sender connects once (a KV link is one long-lived connection too), then sends `size` bytes
`repeats` times, each timed from its first byte to the receiver's answer, and prints one JSON line:
{"bytes": N, "seconds": [...]}. Nothing but the sockets: no framing, no copies beyond the kernel's.
"""

from __future__ import annotations

import argparse
import json
import socket
import time

CHUNK = 1 << 20
ACK = b"k"


def _read_exactly(conn: socket.socket, size: int, buf: memoryview) -> None:
    left = size
    while left:
        got = conn.recv_into(buf, min(left, len(buf)))
        if not got:
            raise ConnectionError(f"the sender closed the link with {left} of {size} bytes unread")
        left -= got


def receive(host: str, port: int, size: int, repeats: int) -> None:
    with socket.create_server((host, port)) as server:
        print("ready", flush=True)
        conn, _ = server.accept()
        with conn:
            buf = memoryview(bytearray(CHUNK))
            for _ in range(repeats):
                _read_exactly(conn, size, buf)
                conn.sendall(ACK)


def send(host: str, port: int, size: int, repeats: int) -> list[float]:
    payload = memoryview(bytes(size))
    seconds = []
    with socket.create_connection((host, port), timeout=120) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(repeats):
            start = time.perf_counter()
            conn.sendall(payload)
            if conn.recv(1) != ACK:
                raise ConnectionError("the receiver did not answer")
            seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=["send", "recv"])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--size", type=int, required=True, help="bytes per send")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.role == "recv":
        receive(args.host, args.port, args.size, args.repeats)
    else:
        print(json.dumps({"bytes": args.size, "seconds": send(args.host, args.port, args.size, args.repeats)}))


if __name__ == "__main__":
    main()
