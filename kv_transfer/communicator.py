"""`Communicator`: the one interface between the NCCL transport's logic and the library that moves the bytes.

`NcclLink` (pool, keys, ordering, deadlines, abort and rebuild) talks to the bytes only through these two
protocols, so the same code runs over CuPy's NCCL on GPUs (`kv_transfer.cupy_comm`) and over a socket pair on
CPUs (`kv_transfer.socket_comm`, which the unit tests use).

Contract, NCCL's own semantics:
- A communicator joins exactly two ranks; `Backend.new_id` (on rank 0, the sender) makes the rendezvous id, the
  peer learns it over the control plane, and both call `Backend.join(id, rank, timeout)`.
- Operations carry no tags: the n-th `send` on one side pairs with the n-th `recv` on the other, and each
  (address, bytes) chunk of a send pairs with the chunk of the same size at the same position of the recv.
  Agreeing on order and sizes is the caller's job (`nccl_keys.match`); a disagreement corrupts or hangs.
- `send`/`recv` enqueue and return a `Pending` at once, in order, on the communicator's one stream. `after` is
  what the send must wait for first (a CUDA event recorded after the forward pass wrote the KV; None: nothing).
- `Pending.wait(timeout)` is True once the operations completed, False if they have not within `timeout`, and
  raises `CommFailed` when the communicator failed (the peer died, or `abort` was called, by any thread).
- `abort()` stops everything in flight and frees the communicator, from any thread; `destroy()` frees an idle
  one. Both are idempotent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from kv_transfer.transport import TransportError

Span = tuple[int, int]  # (address, bytes) of one contiguous piece of a buffer


class CommFailed(TransportError):
    """The communicator is broken: its peer died, an operation failed, or it was aborted."""


class Pending(Protocol):
    def wait(self, timeout: float) -> bool: ...


class Communicator(Protocol):
    def send(self, chunks: Sequence[Span], after: Any) -> Pending: ...

    def recv(self, chunks: Sequence[Span]) -> Pending: ...

    def abort(self) -> None: ...

    def destroy(self) -> None: ...


class Backend(Protocol):
    """Where communicators come from, for one device of this process."""

    def device_uuid(self) -> str:
        """The device's identity: two ranks on one device cannot form a communicator."""

    def new_id(self) -> bytes:
        """Rank 0: a fresh rendezvous id for one communicator."""

    def join(self, unique_id: bytes, rank: int, timeout: float) -> Communicator:
        """Join the communicator of `unique_id` as `rank`; `TransportTimeout` if the peer has not within
        `timeout`, `PeerGone` if the rendezvous failed."""

    def spans(self, buffers: Sequence[Any]) -> list[Span]:
        """(address, bytes) of each C-contiguous buffer, in order; ValueError for one this backend cannot move."""
