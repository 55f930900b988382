"""The `shm` transport: keyed messages between two processes of one node, through shared-memory rings.

Control frames travel on an authenticated Unix socket (abstract namespace, no file to clean up); the bytes travel
through memory. Each side owns the ring it sends through: an anonymous `memfd` of `slots` slots, handed to the peer
over the socket (SCM_RIGHTS) right after both sides proved the cluster secret.

    sender:   DATA(key, length), then per slot: fill a free slot from the message's views, CHUNK(slot, n)
    receiver: per CHUNK: copy the slot straight into the posted buffer, FREE(slot) back

So each byte is copied twice (into the ring, out of it), and the two copies overlap across the slots: the sender
fills slot i+1 while the receiver empties slot i.

Cleanup, by construction: a memfd has no name. Both file descriptors are closed as soon as the rings are mapped,
so the memory lives exactly as long as the two mappings and goes back to the kernel when both processes unmap
it, on `close` or when they die. Nothing can leak under /dev/shm. Linux only (memfd, abstract sockets).

    listener = shm.listen(config)                       # publish listener.address (a short string)
    link = shm.connect(address, config, timeout=5.0)
"""

from __future__ import annotations

import mmap
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kv_transfer.auth import authenticate
from kv_transfer.inbox import Landing
from kv_transfer.link import Link, Listener, Setup, establish
from kv_transfer.transport import FrameError, PeerGone, TransportConfig, TransportError, TransportTimeout
from kv_transfer.wire import Header, Kind, SocketIO, encode_header

RING = struct.Struct("!IQ")  # slots, slot bytes; sent with the ring's file descriptor
MAX_SLOTS = 1024
MAX_SLOT_BYTES = 1 << 30


@dataclass(frozen=True, slots=True)
class RingConfig:
    """The ring this side sends through. More, smaller slots overlap the two copies more finely."""

    slot_bytes: int = 1 << 21
    slots: int = 16

    def __post_init__(self) -> None:
        if not 4096 <= self.slot_bytes <= MAX_SLOT_BYTES or self.slot_bytes % 4096:
            raise ValueError(
                f"slot_bytes must be a multiple of 4096 in [4096, {MAX_SLOT_BYTES}], got {self.slot_bytes}"
            )
        if not 2 <= self.slots <= MAX_SLOTS:
            raise ValueError(f"slots must be in [2, {MAX_SLOTS}], got {self.slots}")


class _Ring:
    """One mapped ring: its memory and its slot geometry."""

    __slots__ = ("map", "slot_bytes", "slots", "view")

    def __init__(self, fd: int, slots: int, slot_bytes: int, writable: bool) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        # No MAP_POPULATE: pages are allocated on first use, so a side that never sends costs no memory.
        self.map = mmap.mmap(fd, slots * slot_bytes, flags=mmap.MAP_SHARED, prot=prot)
        self.view = memoryview(self.map)
        self.slots = slots
        self.slot_bytes = slot_bytes

    def slot(self, index: int, n: int) -> memoryview:
        base = index * self.slot_bytes
        return self.view[base : base + n]

    def close(self) -> None:
        self.view.release()
        self.map.close()


class RingPayload:
    """Moves a message's bytes through our ring (sending) and the peer's (receiving)."""

    __slots__ = ("_cond", "_error", "_free", "_rx", "_taken", "_tx")

    def __init__(self, tx: _Ring, rx: _Ring) -> None:
        self._tx = tx
        self._rx = rx
        self._free = list(range(tx.slots))
        self._taken = [False] * tx.slots
        self._cond = threading.Condition()
        self._error: TransportError | None = None

    def send(self, io: SocketIO, head: bytes, views: Sequence[memoryview], deadline: float) -> None:
        with io.write_lock:
            io.write([head], deadline)
        # Slots are filled to the brim whatever the views' sizes: a layer's many small blocks share a slot.
        step = self._tx.slot_bytes
        index, filled = -1, 0
        for view in views:
            off = 0
            while off < len(view):
                if index < 0:
                    index, filled = self._take(deadline), 0
                n = min(step - filled, len(view) - off)
                self._tx.slot(index, filled + n)[filled:] = view[off : off + n]
                filled, off = filled + n, off + n
                if filled == step:
                    self._post(io, index, filled, deadline)
                    index = -1
        if index >= 0:
            self._post(io, index, filled, deadline)

    @staticmethod
    def _post(io: SocketIO, index: int, n: int, deadline: float) -> None:
        with io.write_lock:
            io.write([encode_header(Header(Kind.CHUNK, 0, index, n))], deadline)

    def _take(self, deadline: float) -> int:
        with self._cond:
            while not self._free:
                if self._error is not None:
                    raise PeerGone(f"the link went down while sending: {self._error}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportTimeout("the peer stopped emptying the ring: send deadline passed mid-message")
                self._cond.wait(left)
            index = self._free.pop()  # the most recently freed slot: likely still in cache
            self._taken[index] = True
            return index

    def receive(self, io: SocketIO, landing: Landing, length: int) -> None:
        left = length
        while left:
            header, _ = io.read_header(self._rx.slot_bytes, idle_ok=False)
            if header.kind is Kind.FREE:
                self.on_frame(header)
                continue
            if header.kind is not Kind.CHUNK:
                raise FrameError(f"{header.kind.name} frame in the middle of a message")
            n = header.length
            if header.arg >= self._rx.slots or not 0 < n <= left:
                raise FrameError(f"bad CHUNK: slot {header.arg} of {self._rx.slots}, {n} bytes with {left} to come")
            with landing.lock:
                landing.write(self._rx.slot(header.arg, n))
            left -= n
            try:
                with io.write_lock:
                    io.write([encode_header(Header(Kind.FREE, 0, header.arg))], time.monotonic() + io.stall_s)
            except PeerGone:
                # The peer sent its chunks and hung up: they are in the ring still, and this message may be whole.
                # If more chunks were due, the next read finds the socket closed.
                continue

    def on_frame(self, header: Header) -> None:
        if header.kind is not Kind.FREE:
            raise FrameError(f"{header.kind.name} frame outside a message")
        index = header.arg
        with self._cond:
            if index >= self._tx.slots or not self._taken[index]:
                raise FrameError(f"the peer freed slot {index}, which is not in use")
            self._taken[index] = False
            self._free.append(index)
            self._cond.notify()

    def fail(self, error: TransportError) -> None:
        with self._cond:
            self._error = self._error or error
            self._cond.notify_all()

    def close(self) -> None:
        self._tx.close()
        self._rx.close()


def _make_ring(ring: RingConfig) -> tuple[int, _Ring]:
    fd = os.memfd_create("pdkv-ring", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, ring.slots * ring.slot_bytes)
        return fd, _Ring(fd, ring.slots, ring.slot_bytes, writable=True)
    except BaseException:
        os.close(fd)
        raise


def _receive_ring(sock: socket.socket) -> _Ring:
    msg, fds, _, _ = socket.recv_fds(sock, RING.size, 4, socket.MSG_CMSG_CLOEXEC)
    try:
        if len(msg) != RING.size or len(fds) != 1:
            raise FrameError(
                f"expected the peer's ring: {RING.size} bytes and 1 descriptor, got {len(msg)}, {len(fds)}"
            )
        slots, slot_bytes = RING.unpack(msg)
        if not (2 <= slots <= MAX_SLOTS and 0 < slot_bytes <= MAX_SLOT_BYTES):
            raise FrameError(f"the peer's ring has {slots} slots of {slot_bytes} bytes")
        if os.fstat(fds[0]).st_size != slots * slot_bytes:
            raise FrameError("the peer's ring is smaller than it claims")
        return _Ring(fds[0], slots, slot_bytes, writable=False)
    finally:
        for fd in fds:
            os.close(fd)  # the mapping keeps the memory; no descriptor outlives the handshake


def _exchange_rings(sock: socket.socket, ring: RingConfig, dialer: bool) -> RingPayload:
    """Hand our ring to the peer and map theirs (the dialer gives first); no descriptor survives this call."""
    fd, tx = _make_ring(ring)
    rx: _Ring | None = None
    try:
        if not dialer:
            rx = _receive_ring(sock)
        socket.send_fds(sock, [RING.pack(ring.slots, ring.slot_bytes)], [fd])
        if rx is None:
            rx = _receive_ring(sock)
        return RingPayload(tx, rx)
    except BaseException as exc:
        for mapped in (tx, rx):
            if mapped is not None:
                mapped.close()
        if isinstance(exc, TimeoutError) and not isinstance(exc, TransportTimeout):
            raise TransportTimeout("the peer did not hand over its ring in time") from exc
        if isinstance(exc, OSError):
            raise PeerGone(f"connection lost while exchanging rings: {exc}") from exc
        raise
    finally:
        os.close(fd)


def _setup(config: TransportConfig, ring: RingConfig) -> Setup:
    def setup(sock: socket.socket, dialer: bool) -> Link:
        peer = authenticate(sock, config, dialer)  # before any memory is shared with the peer
        sock.settimeout(config.handshake_timeout_s)
        payload = _exchange_rings(sock, ring, dialer)
        return Link(SocketIO(sock, config.stall_timeout_s), peer, payload, config)

    return setup


def listen(config: TransportConfig, ring: RingConfig | None = None, backlog: int = 64) -> Listener[str]:
    """A listener on a fresh abstract Unix socket; its `address` (a string) is what `connect` takes."""
    name = f"pdkv-{secrets.token_hex(8)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("\0" + name)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return Listener(sock, name, _setup(config, ring or RingConfig()))


def connect(address: str, config: TransportConfig, timeout: float, ring: RingConfig | None = None) -> Link:
    """Dial a `shm` listener of this node and authenticate; `TransportTimeout` past `timeout`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect("\0" + address)
    except TimeoutError as exc:
        sock.close()
        raise TransportTimeout(f"could not connect to {address} within {timeout:g}s") from exc
    except OSError as exc:
        sock.close()
        raise PeerGone(f"could not connect to shm listener {address}: {exc}") from exc
    return establish(sock, _setup(config, ring or RingConfig()), dialer=True)
