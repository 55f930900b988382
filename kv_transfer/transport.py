"""`Transport`: moves keyed bytes between two endpoints; knows nothing of requests.

Contract (every transport: `tcp`, `shm`, and the NCCL one):
- A transport is one authenticated link to one peer (`peer`, an `Endpoint`). Either side may send.
- `send(key, buffers, timeout)` moves the concatenation of `buffers` to the peer under `key`. It returns once the
  bytes are handed to the link (the sender may then reuse its buffers), not once they have landed.
- `expect(key, into)` posts the destination for `key`: the incoming bytes are written straight into `into`
  (scattered across its buffers in order). `wait(key, timeout)` blocks until they have landed and returns the
  byte count. A message that arrives before its `expect` is held in a bounded stash and copied on `expect`.
  The total sizes must match, else `wait` raises `SizeMismatch` and `into` is left in an undefined state.
- After `wait` raises `TransportTimeout`, the transport no longer writes into `into`: the caller owns it again.
  Late bytes for that key are discarded.
- Keys are opaque bytes (at most `MAX_KEY_BYTES`), unique among the keys in flight on one link.
- Errors are typed: a stalled peer gives `TransportTimeout`, a dropped or closed link `PeerGone`, a peer without
  the cluster secret `AuthFailed`, a malformed frame `FrameError` (the link is then closed). A link that breaks
  mid-message is unusable afterwards; every later call raises `PeerGone`.
- `close()` is idempotent, tells the peer, and releases every OS resource (sockets, shared memory).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from kv_transfer.endpoint import Endpoint

MAX_KEY_BYTES = 1024
SECRET_ENV = "PDSERVE_KV_SECRET"  # the cluster secret, hex: the one place it is read from
HANDSHAKE_TIMEOUT_S = 5.0  # a new link's authentication must finish within this long


class TransportError(Exception):
    """Root of every transport failure."""


class TransportTimeout(TransportError, TimeoutError):
    """The peer made no progress in time (a stalled peer, or a deadline too short for the bytes)."""


class PeerGone(TransportError):
    """The link is down: the peer closed it, died, or the link broke mid-message."""


class AuthFailed(TransportError):
    """The peer could not prove it holds the cluster secret (or refused ours)."""


class FrameError(TransportError):
    """The peer sent bytes that are not a valid frame; the link is closed."""


class SizeMismatch(TransportError):
    """The message for a key has a different size than the destination posted for it."""

    def __init__(self, key: bytes, sent: int, posted: int) -> None:
        super().__init__(f"key {key!r}: the peer sent {sent} bytes, the destination posted holds {posted}")
        self.key = key
        self.sent = sent
        self.posted = posted


@runtime_checkable
class Transport(Protocol):
    """One link to one peer. Blocking calls, safe to call from several threads at once."""

    @property
    def peer(self) -> Endpoint: ...

    def send(self, key: bytes, buffers: Sequence[memoryview], timeout: float) -> None: ...

    def expect(self, key: bytes, into: Sequence[memoryview]) -> None: ...

    def wait(self, key: bytes, timeout: float) -> int: ...

    def close(self) -> None: ...


def recv(transport: Transport, key: bytes, into: Sequence[memoryview], timeout: float) -> int:
    """Post `into` for `key` and wait for it: the one-call form of `expect` then `wait`."""
    transport.expect(key, into)
    return transport.wait(key, timeout)


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """What every CPU transport needs: who we are, the cluster secret, and the limits we hold the peer to.

    `stall_timeout_s`: a peer that makes no progress in the middle of a message for this long is dead.
    `max_message_bytes`: the largest message accepted (bigger frames are refused as garbage).
    `max_stash_bytes`: room for messages that arrive before their `expect`; a peer that overflows it is cut off.
    """

    endpoint: Endpoint
    secret: bytes
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S
    stall_timeout_s: float = 10.0
    max_message_bytes: int = 1 << 34
    max_stash_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if len(self.secret) < 16:
            raise ValueError("the cluster secret must be at least 16 bytes")
        for name in ("handshake_timeout_s", "stall_timeout_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        if self.max_message_bytes < 1 or self.max_stash_bytes < 0:
            raise ValueError("max_message_bytes must be >= 1 and max_stash_bytes >= 0")

    def __repr__(self) -> str:
        return f"TransportConfig(endpoint={self.endpoint}, secret=<{len(self.secret)} bytes>)"  # never the secret


def byte_views(buffers: Sequence[object], writable: bool) -> list[memoryview]:
    """Flat unsigned-byte views of `buffers` (any C-contiguous buffer: bytes, bytearray, numpy, tensor.numpy())."""
    views = []
    for buf in buffers:
        view = memoryview(buf)  # type: ignore[arg-type]
        if not view.c_contiguous:
            raise ValueError("transport buffers must be C-contiguous")
        if writable and view.readonly:
            raise ValueError("a destination buffer is read-only")
        views.append(view.cast("B") if view.format != "B" or view.ndim != 1 else view)
    return views


def check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray):
        raise TypeError(f"a transport key is bytes, got {type(key).__name__}")
    if len(key) > MAX_KEY_BYTES:
        raise ValueError(f"a transport key is at most {MAX_KEY_BYTES} bytes, got {len(key)}")
    return bytes(key)
