"""`SocketBackend`: the `Communicator` interface over one TCP connection per communicator, on host memory.

The CPU stand-in for NCCL, with NCCL's semantics (`kv_transfer.communicator`): rank 0's `new_id` opens a listener
and the id names it (as NCCL's unique id names its root's address); operations run in order on one thread per
communicator (its "stream") and move raw bytes at the buffers' addresses, untagged; `abort` shuts the socket, so
an operation blocked on a dead or stalled peer fails at once. It lets the NCCL transport's logic (pool, keys,
ordering, abort and rebuild) run for real on machines without a GPU; serving uses the tcp and shm transports there.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import socket
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kv_transfer.communicator import CommFailed, Span
from kv_transfer.transport import PeerGone, TransportTimeout, byte_views

TOKEN_BYTES = 16


@dataclass(eq=False)
class _Op:
    send: bool
    chunks: Sequence[Span]
    done: threading.Event = field(default_factory=threading.Event)
    error: str = ""

    def wait(self, timeout: float) -> bool:
        finished = self.done.wait(max(timeout, 0.0))
        if self.error:
            raise CommFailed(self.error)
        return finished


class SocketComm:
    """One two-rank communicator over one connected socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._ops: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._error = ""
        self._stream = threading.Thread(target=self._run, name="pdkv-sockcomm", daemon=True)
        self._stream.start()

    def send(self, chunks: Sequence[Span], after: Any) -> _Op:
        return self._enqueue(_Op(True, list(chunks)))  # host memory is written before the call: nothing to await

    def recv(self, chunks: Sequence[Span]) -> _Op:
        return self._enqueue(_Op(False, list(chunks)))

    def abort(self) -> None:
        self._stop("the communicator was aborted")

    def destroy(self) -> None:
        self._stop("the communicator was destroyed")

    def _enqueue(self, op: _Op) -> _Op:
        with self._lock:
            if self._error:
                op.error = self._error
                op.done.set()
            else:
                self._ops.put(op)
        return op

    def _stop(self, why: str) -> None:
        with self._lock:
            if self._error:
                return
            self._error = why
            self._ops.put(None)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes an operation blocked on the peer
        self._sock.close()

    def _run(self) -> None:
        while (op := self._ops.get()) is not None:
            try:
                for address, nbytes in op.chunks:
                    view = memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")
                    if op.send:
                        self._sock.sendall(view)
                    else:
                        _recv_exactly(self._sock, view)
            except OSError as exc:
                op.error = self._error or f"the peer is gone: {exc}"
                self._stop(op.error)
            op.done.set()
        while (left := self._ops.get_nowait() if not self._ops.empty() else None) is not None:
            left.error = self._error
            left.done.set()


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionResetError("the peer closed the communicator")
        got += n


class SocketBackend:
    """Communicators between processes (or threads) of hosts that reach each other at `host`."""

    def __init__(self, host: str = "127.0.0.1", device: str = "") -> None:
        self._host = host
        self._device = device or f"cpu-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # every backend is its own "device"
        self._rendezvous: dict[bytes, socket.socket] = {}
        self._lock = threading.Lock()

    def device_uuid(self) -> str:
        return self._device

    def new_id(self) -> bytes:
        server = socket.create_server((self._host, 0), backlog=1)
        token = os.urandom(TOKEN_BYTES)
        with self._lock:
            self._rendezvous[token] = server
        host, port = server.getsockname()[:2]
        return token + f"{host}:{port}".encode()

    def join(self, unique_id: bytes, rank: int, timeout: float) -> SocketComm:
        token, address = unique_id[:TOKEN_BYTES], unique_id[TOKEN_BYTES:].decode()
        return SocketComm(self._accept(token, timeout) if rank == 0 else _connect(token, address, timeout))

    def spans(self, buffers: Sequence[Any]) -> list[Span]:
        return [(int(np.frombuffer(v, dtype=np.uint8).ctypes.data), v.nbytes) if v.nbytes else (0, 0)
                for v in byte_views(buffers, writable=False)]

    def _accept(self, token: bytes, timeout: float) -> socket.socket:
        with self._lock:
            server = self._rendezvous.pop(token, None)
        if server is None:
            raise PeerGone("rank 0 joins only a communicator whose id it made")
        try:
            server.settimeout(max(timeout, 0.001))
            try:
                conn, _ = server.accept()
            except TimeoutError as exc:
                raise TransportTimeout(f"the peer did not join the communicator within {timeout:g}s") from exc
            conn.settimeout(max(timeout, 0.001))
            if _read(conn, TOKEN_BYTES) != token:
                conn.close()
                raise PeerGone("a peer joined with the wrong communicator id")
            conn.settimeout(None)
            return conn
        except OSError as exc:
            raise PeerGone(f"the rendezvous failed: {exc}") from exc
        finally:
            server.close()


def _connect(token: bytes, address: str, timeout: float) -> socket.socket:
    host, _, port = address.rpartition(":")
    try:
        sock = socket.create_connection((host, int(port)), timeout=max(timeout, 0.001))
        sock.sendall(token)
    except TimeoutError as exc:
        raise TransportTimeout(f"rank 0 did not answer within {timeout:g}s") from exc
    except OSError as exc:
        raise PeerGone(f"could not join the communicator at {address}: {exc}") from exc
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_exactly(sock, memoryview(buf))
    return bytes(buf)
