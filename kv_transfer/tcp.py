"""The `tcp` transport: keyed messages over one TCP connection, received straight into the posted buffers.

Use it between nodes (on one node `shm` is faster). The payload follows its DATA header inline; the reader thread
`recv_into`s it directly into the destination posted with `expect` (one kernel-to-user copy, no staging), or into
the stash when it came first. Sockets run with TCP_NODELAY so small layers are not held back by Nagle.

    listener = tcp.listen(config)                      # on the receiving worker; publish listener.address
    link = tcp.connect(address, config, timeout=5.0)   # on the sending worker
    peer_link = listener.accept(timeout=5.0)
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence

from kv_transfer.auth import authenticate
from kv_transfer.inbox import Landing
from kv_transfer.link import Link, Listener, Setup, establish
from kv_transfer.transport import FrameError, PeerGone, TransportConfig, TransportError, TransportTimeout
from kv_transfer.wire import Header, SocketIO


class InlinePayload:
    """The message's bytes follow its header on the socket."""

    __slots__ = ()

    def send(self, io: SocketIO, head: bytes, views: Sequence[memoryview], deadline: float) -> None:
        with io.write_lock:
            io.write([head, *views], deadline)

    def receive(self, io: SocketIO, landing: Landing, length: int) -> None:
        left = length
        last = time.monotonic()
        while left:
            with landing.lock:
                n = io.recv_some(landing.region(left))
                landing.advance(n)
            if n:
                left -= n
                last = time.monotonic()
            elif io.closing:
                raise PeerGone("the link was closed locally")
            elif time.monotonic() - last > io.stall_s:
                raise TransportTimeout(f"the peer stalled for {io.stall_s:g}s in the middle of a message")

    def on_frame(self, header: Header) -> None:
        raise FrameError(f"{header.kind.name} frames do not belong on a tcp link")

    def fail(self, error: TransportError) -> None:
        pass  # nobody waits on an inline payload

    def close(self) -> None:
        pass


def _setup(config: TransportConfig) -> Setup:
    def setup(sock: socket.socket, dialer: bool) -> Link:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = authenticate(sock, config, dialer)
        return Link(SocketIO(sock, config.stall_timeout_s), peer, InlinePayload(), config)

    return setup


def listen(
    config: TransportConfig, host: str = "127.0.0.1", port: int = 0, backlog: int = 64
) -> Listener[tuple[str, int]]:
    """A listener on `host:port` (port 0: any free port); its `address` is the `(host, port)` to dial."""
    sock = socket.create_server((host, port), backlog=backlog)
    host, port = sock.getsockname()[:2]
    return Listener(sock, (host, port), _setup(config))


def dial(address: tuple[str, int], timeout: float) -> socket.socket:
    """A connected socket to `address`; `TransportTimeout` past `timeout`, `PeerGone` if it is refused."""
    try:
        return socket.create_connection(address, timeout=timeout)
    except TimeoutError as exc:
        raise TransportTimeout(f"could not connect to {address} within {timeout:g}s") from exc
    except OSError as exc:
        raise PeerGone(f"could not connect to {address}: {exc}") from exc


def connect(address: tuple[str, int], config: TransportConfig, timeout: float) -> Link:
    """Dial a `tcp` listener and authenticate; `TransportTimeout` if it takes longer than `timeout`."""
    return establish(dial(address, timeout), _setup(config), dialer=True)
