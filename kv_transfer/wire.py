"""Frames on a transport's socket, and blocking socket I/O with deadlines.

Every frame opens with a fixed 18-byte header, packed with `struct` (network order), then `key_len` key bytes:

    magic b"KV" | version u8 | kind u8 | key_len u16 | arg u32 | length u64

    DATA  key, length = message size; over TCP the payload follows inline, over shm it follows as CHUNK frames
    CHUNK arg = ring slot, length = bytes in it (shm only)
    FREE  arg = ring slot the receiver has copied out, sender may reuse it (shm only)
    BYE   the peer closes cleanly

`decode_header` checks every field before anything is allocated: a wrong magic or version, an unknown kind, an
oversized key or message raise `FrameError`. Nothing read from the network is ever unpickled.

`SocketIO` keeps the socket in blocking mode with kernel send/receive timeouts of one `TICK_S`, so a blocked call
wakes up regularly to check its deadline: a write past its deadline, or a read that makes no progress for
`stall_s` in the middle of a frame, raises `TransportTimeout`; a reset or closed connection raises `PeerGone`.
"""

from __future__ import annotations

import contextlib
import enum
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kv_transfer.transport import MAX_KEY_BYTES, FrameError, PeerGone, TransportTimeout

HEADER = struct.Struct("!2sBBHIQ")
MAGIC = b"KV"
VERSION = 1
TICK_S = 0.1
MAX_READ = 16 << 20  # one recv call at most; bounds how long a withdrawn destination stays busy
MAX_IOV = 1024  # buffers per sendmsg call: Linux's IOV_MAX


class Kind(enum.IntEnum):
    DATA = 1
    CHUNK = 2
    FREE = 3
    BYE = 4


@dataclass(frozen=True, slots=True)
class Header:
    kind: Kind
    key_len: int = 0
    arg: int = 0
    length: int = 0


def encode_header(header: Header) -> bytes:
    return HEADER.pack(MAGIC, VERSION, header.kind, header.key_len, header.arg, header.length)


def decode_header(raw: bytes | bytearray | memoryview, max_length: int) -> Header:
    """Parse and validate one header; `FrameError` for anything a well-behaved peer never sends."""
    if len(raw) != HEADER.size:
        raise FrameError(f"a frame header is {HEADER.size} bytes, got {len(raw)}")
    magic, version, kind, key_len, arg, length = HEADER.unpack(raw)
    if magic != MAGIC:
        raise FrameError(f"bad frame magic {bytes(magic)!r}: the peer does not speak this protocol")
    if version != VERSION:
        raise FrameError(f"frame version {version}, this side speaks {VERSION}")
    if kind not in Kind._value2member_map_:
        raise FrameError(f"unknown frame kind {kind}")
    kind = Kind(kind)
    if key_len > MAX_KEY_BYTES:
        raise FrameError(f"key of {key_len} bytes, the limit is {MAX_KEY_BYTES}")
    if length > max_length:
        raise FrameError(f"{kind.name} frame of {length} bytes, the limit is {max_length}")
    if kind is not Kind.DATA and key_len:
        raise FrameError(f"{kind.name} frame carries a key")
    if kind in (Kind.FREE, Kind.BYE) and length:
        raise FrameError(f"{kind.name} frame carries {length} bytes")
    return Header(kind, key_len, arg, length)


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1e6))


class SocketIO:
    """A connected stream socket with deadline-bounded reads and writes. Writes are serialized by `write_lock`."""

    __slots__ = ("_header_buf", "closing", "sock", "stall_s", "write_lock")

    def __init__(self, sock: socket.socket, stall_s: float) -> None:
        sock.setblocking(True)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(TICK_S))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(TICK_S))
        self.sock = sock
        self.stall_s = stall_s
        self.write_lock = threading.Lock()
        self.closing = False
        self._header_buf = bytearray(HEADER.size)

    def write(self, views: Sequence[bytes | memoryview], deadline: float) -> None:
        """Write every view in order, gathered into as few `sendmsg` calls as the socket allows; the caller holds
        `write_lock` when frames must not interleave."""
        pending = [memoryview(v) for v in views if len(v)]
        first = 0
        while first < len(pending):
            try:
                sent = self.sock.sendmsg(pending[first : first + MAX_IOV])
            except BlockingIOError:
                sent = 0  # one tick without room in the socket buffer
            except OSError as exc:
                raise PeerGone(f"connection lost while sending: {exc}") from exc
            while sent:
                head = pending[first]
                if sent < len(head):
                    pending[first] = head[sent:]
                    break
                sent -= len(head)
                first += 1
            if first < len(pending) and time.monotonic() > deadline:
                raise TransportTimeout("the peer stopped reading: send deadline passed mid-message")

    def recv_some(self, view: memoryview) -> int:
        """One receive into `view`: the byte count, 0 after a tick without data; `PeerGone` at end of stream."""
        try:
            n = self.sock.recv_into(view, min(len(view), MAX_READ), socket.MSG_WAITALL)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise PeerGone(f"connection lost while receiving: {exc}") from exc
        if n == 0:
            raise PeerGone("the peer closed the connection" if not self.closing else "the link was closed locally")
        return n

    def read_exact(self, view: memoryview, idle_ok: bool = False) -> None:
        """Fill `view`. With `idle_ok`, waiting before the first byte is no stall (an idle link)."""
        off, end = 0, len(view)
        last = time.monotonic()
        while off < end:
            n = self.recv_some(view[off:])
            if n:
                off, last = off + n, time.monotonic()
            elif self.closing:
                raise PeerGone("the link was closed locally")
            elif (off or not idle_ok) and time.monotonic() - last > self.stall_s:
                raise TransportTimeout(f"the peer stalled for {self.stall_s:g}s in the middle of a frame")

    def read_header(self, max_length: int, idle_ok: bool = True) -> tuple[Header, bytes]:
        """The next frame's header and key; with `idle_ok`, blocks for as long as the link is idle."""
        buf = memoryview(self._header_buf)
        self.read_exact(buf, idle_ok)
        header = decode_header(buf, max_length)
        key = b""
        if header.key_len:
            raw = bytearray(header.key_len)
            self.read_exact(memoryview(raw))
            key = bytes(raw)
        return header, key

    def shutdown(self) -> None:
        self.closing = True
        with contextlib.suppress(OSError):  # already disconnected
            self.sock.shutdown(socket.SHUT_RDWR)
