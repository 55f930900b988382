"""`Link`: one authenticated socket to one peer, carrying keyed messages; the `Transport` of the CPU transports.

A link owns a `SocketIO`, an `Inbox` and a reader thread. How a message's bytes travel after its DATA header is
the `Payload`'s business (inline on the socket for `tcp`, through a shared-memory ring for `shm`): composition,
not subclasses. `Listener` accepts links; `tcp.listen`/`shm.listen` and `tcp.connect`/`shm.connect` build them.

Life of a link:
- up: sends are serialized by a message lock; the reader thread lands incoming messages in the inbox.
- down (the peer closed or died, a frame was garbage, a message broke off midway): the first cause is kept,
  every waiter fails with its kind, and later calls raise `PeerGone` naming it.
- closed (`close`, idempotent): says BYE when no message is mid-flight, stops the reader, releases the socket and
  whatever the payload holds (shared memory).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

from kv_transfer.endpoint import Endpoint
from kv_transfer.inbox import Inbox, Landing
from kv_transfer.transport import (
    PeerGone,
    TransportConfig,
    TransportError,
    TransportTimeout,
    byte_views,
    check_key,
)
from kv_transfer.wire import Header, Kind, SocketIO, encode_header

CLOSE_GRACE_S = 1.0


class Payload(Protocol):
    """The part of a link that differs between transports."""

    def send(self, io: SocketIO, head: bytes, views: Sequence[memoryview], deadline: float) -> None:
        """Write the DATA frame `head` and the message's bytes (the caller holds the message lock)."""

    def receive(self, io: SocketIO, landing: Landing, length: int) -> None:
        """Reader thread: take in the `length` bytes following a DATA header, into `landing`."""

    def on_frame(self, header: Header) -> None:
        """Reader thread: a frame between messages other than DATA and BYE."""

    def fail(self, error: TransportError) -> None:
        """The link is down: wake whoever waits on the payload."""

    def close(self) -> None:
        """Release OS resources; called once nothing uses the payload."""


class Link:
    """A `Transport` over one connected, authenticated socket."""

    __slots__ = ("_closed", "_down", "_inbox", "_io", "_max_message", "_payload", "_peer", "_reader", "_send_lock")

    def __init__(self, io: SocketIO, peer: Endpoint, payload: Payload, config: TransportConfig) -> None:
        self._io = io
        self._peer = peer
        self._payload = payload
        self._max_message = config.max_message_bytes
        self._inbox = Inbox(config.max_stash_bytes)
        self._send_lock = threading.Lock()
        self._down: TransportError | None = None
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, name=f"pdkv-reader-{peer}", daemon=True)
        self._reader.start()

    @property
    def peer(self) -> Endpoint:
        return self._peer

    def send(self, key: bytes, buffers: Sequence[memoryview], timeout: float) -> None:
        key = check_key(key)
        views = byte_views(buffers, writable=False)
        length = sum(len(v) for v in views)
        if length > self._max_message:
            raise ValueError(f"a message is at most {self._max_message} bytes, got {length}")
        deadline = time.monotonic() + timeout
        if not self._send_lock.acquire(timeout=max(timeout, 0.0)):
            raise TransportTimeout(f"other sends held the link to {self._peer} for the whole {timeout:g}s")
        try:
            self._check_up()
            head = encode_header(Header(Kind.DATA, len(key), 0, length)) + key
            try:
                self._payload.send(self._io, head, views, deadline)
            except TransportError as exc:
                self._break(exc)  # the peer saw part of a message: the stream is out of step for good
                raise
        finally:
            self._send_lock.release()

    def expect(self, key: bytes, into: Sequence[memoryview]) -> None:
        self._inbox.post(check_key(key), byte_views(into, writable=True))

    def wait(self, key: bytes, timeout: float, arrivals: list[float] | None = None) -> int:
        """See `Inbox.wait`."""
        return self._inbox.wait(check_key(key), timeout, arrivals)

    def holds(self, key: bytes) -> bool:
        """Whether `key`'s message has landed and waits to be claimed."""
        return self._inbox.holds(check_key(key))

    @property
    def stashed_bytes(self) -> int:
        """Bytes held for keys nobody has posted yet (the receive buffer in use)."""
        return self._inbox.stashed_bytes

    def drop_stash(self, doomed: Callable[[bytes, float], bool]) -> int:
        """Frees unclaimed stashes for which `doomed(key, since)` holds (see `Inbox.drop_stash`)."""
        return self._inbox.drop_stash(doomed)

    def cancel(self, keys: list[bytes], error: TransportError) -> None:
        """Fails the waits on these posted keys at once (see `Inbox.cancel`)."""
        self._inbox.cancel(keys, error)

    def refuse(self, keys: list[bytes]) -> None:
        """Late bytes for these unposted keys are discarded (see `Inbox.refuse`)."""
        self._inbox.refuse(keys)

    @property
    def is_up(self) -> bool:
        return not self._closed and self._down is None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        got = self._send_lock.acquire(timeout=CLOSE_GRACE_S)
        try:
            if got and self._down is None:
                self._say_bye()
            self._break(PeerGone(f"the link to {self._peer} was closed locally"))
            self._reader.join(timeout=self._io.stall_s + CLOSE_GRACE_S)
            if not got:  # a send was stuck; with the socket shut it fails fast
                got = self._send_lock.acquire(timeout=CLOSE_GRACE_S)
            if got and not self._reader.is_alive():
                self._payload.close()  # else something may still touch it: leave it to the collector
            self._io.sock.close()
        finally:
            if got:
                self._send_lock.release()

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _say_bye(self) -> None:
        try:
            with self._io.write_lock:
                self._io.write([encode_header(Header(Kind.BYE))], time.monotonic() + CLOSE_GRACE_S)
        except TransportError:
            pass  # the peer is gone already; closing goes on

    def _check_up(self) -> None:
        if self._closed:
            raise PeerGone(f"the link to {self._peer} is closed")
        if self._down is not None:
            raise PeerGone(f"the link to {self._peer} is down: {self._down}")

    def _break(self, error: TransportError) -> None:
        if self._down is None:
            self._down = error
        self._inbox.fail(self._down)  # waits out a write in progress, so no waiter sees its buffer still written
        self._payload.fail(self._down)
        self._io.shutdown()

    def _read_loop(self) -> None:
        try:
            while True:
                header, key = self._io.read_header(self._max_message)
                if header.kind is Kind.DATA:
                    landing = self._inbox.begin(key, header.length)
                    self._payload.receive(self._io, landing, header.length)
                    self._inbox.finish(key, landing)
                elif header.kind is Kind.BYE:
                    raise PeerGone(f"{self._peer} closed the link")
                else:
                    self._payload.on_frame(header)
        except TransportError as exc:
            self._break(exc)
        except Exception as exc:  # a bug must not leave waiters hanging until their timeouts
            self._break(PeerGone(f"the reader of the link to {self._peer} failed: {exc!r}"))
            raise


Setup = Callable[[socket.socket, bool], Link]
Address = TypeVar("Address")


class Listener(Generic[Address]):
    """Accepts links on a bound, listening socket; `setup` authenticates each and builds its `Link`.

    `address` is what the peer passes to its transport's `connect`.
    """

    __slots__ = ("_setup", "_sock", "address")

    def __init__(self, sock: socket.socket, address: Address, setup: Setup) -> None:
        self._sock = sock
        self._setup = setup
        self.address = address

    def accept(self, timeout: float) -> Link:
        """The next peer that proves the cluster secret; `AuthFailed` for one that does not (call again)."""
        return self.handshake(self.accept_connection(timeout))

    def accept_connection(self, timeout: float) -> socket.socket:
        """The next connection, not yet authenticated: pass it to `handshake` (on another thread, so a peer that
        says nothing cannot hold up the ones behind it)."""
        self._sock.settimeout(timeout)
        try:
            conn, _ = self._sock.accept()
        except TimeoutError as exc:
            raise TransportTimeout(f"no peer connected within {timeout:g}s") from exc
        return conn

    def handshake(self, conn: socket.socket) -> Link:
        """Authenticate an accepted connection (within the handshake timeout) and build its link; the connection is
        closed if that fails."""
        return establish(conn, self._setup, dialer=False)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Listener[Address]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def establish(sock: socket.socket, setup: Setup, dialer: bool) -> Link:
    """Run `setup` on a fresh connection; the socket is closed if it fails."""
    try:
        return setup(sock, dialer)
    except BaseException:
        sock.close()
        raise
