"""`NcclLink`: one layer of KV at a time from a prefill GPU straight into a decode GPU's KV blocks.

A thin shell over `nccl_pool` and `nccl_keys`: the pool decides which communicators live, the matching rules
decide what goes on the wire; this module turns those decisions into calls on a `communicator.Backend`
(`cupy_comm.CupyBackend` on GPUs; `socket_comm.SocketBackend` runs the same logic on CPUs) and asks the peer
through a `Control` (`nccl_control.LinkControl`, over the pair's authenticated tcp link).

    link = NcclLink(NcclConfig(endpoint), control, CupyBackend(device=0))
    link.send(decode, TransferKey(rid, my_epoch, layer), [kv_views...], timeout, after=forward_done)   # prefill
    link.recv(prefill, TransferKey(rid, prefill.epoch, layer), [block_views...], timeout)             # decode

Contract (the `Transport` one, for device buffers, one way):
- Buffers are what the backend moves (`Backend.spans`: device arrays with `__cuda_array_interface__` on this
  link's GPU for CuPy, host buffers for the socket backend);
  a message is their concatenation, received scattered across `into`.
- `send` returns once NCCL has read the buffers (the caller may then free the KV blocks); `recv` returns the
  byte count once they have landed. Both run on one dedicated stream per communicator; `after` (a CUDA event
  recorded where the KV was written) orders the send behind the forward pass that wrote it.
- Communicators are made on first use per peer (the sender makes the unique id and hands it over through
  `Control.exchange_id`), kept under the pool's memory budget, and the least recently used idle ones destroyed.
- A transfer past its deadline, or an NCCL error, aborts the whole communicator (`ncclCommAbort`): every
  transfer in flight on it fails (`TransportTimeout` for the late one, `PeerGone` for the rest) and the next
  transfer builds a new generation with a new id. Nothing is ever left posted on a dead communicator, so the
  caller's ticket fails through the usual protocol and frees its blocks.
- A peer on the same device cannot be reached (NCCL refuses two ranks on one device): `SameDevice`, raised
  before anything is built; the caller routes such pairs to a CPU transport (`choose_path`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kv_transfer.communicator import Backend, CommFailed, Communicator, Pending
from kv_transfer.endpoint import Endpoint
from kv_transfer.nccl_keys import (
    RECEIVER_RANK,
    SENDER_RANK,
    Expect,
    Go,
    Offer,
    OutOfOrder,
    Reject,
    RejectCode,
    SendOrder,
    TransferKey,
    choose_path,
    match,
    split,
)
from kv_transfer.nccl_pool import CommPool, CommState, Create, Evict, Lease, PairView, PoolConfig, Refuse
from kv_transfer.transport import PeerGone, SizeMismatch, TransportError, TransportTimeout


class SameDevice(TransportError, NotImplementedError):
    """Both ends are on one GPU. The CUDA IPC path (cudaIpcGetMemHandle on the sender's KV blocks,
    cudaIpcOpenMemHandle and cudaMemcpyAsync on the receiver) is not implemented: use `shm` or `tcp`."""


class PoolExhausted(TransportError):
    """The communicator budget is full of pairs with transfers in flight."""


class Control(Protocol):
    """The authenticated control plane between the two workers (the caller provides it)."""

    def device_of(self, peer: Endpoint, timeout: float) -> str:
        """The UUID of the GPU `peer` runs on."""

    def exchange_id(
        self, peer: Endpoint, generation: int, unique_id: bytes | None, timeout: float
    ) -> tuple[int, bytes]:
        """Sender: hand `unique_id` for its `generation` to `peer`; returns them. Receiver (`unique_id` None):
        the first id `peer` offers for a generation newer than `generation`, with that generation."""

    def offer(self, peer: Endpoint, offer: Offer, timeout: float) -> Go | Reject:
        """Sender: announce `offer`, return the receiver's answer."""

    def next_offer(self, peer: Endpoint, slot: bytes, timeout: float) -> Offer:
        """Receiver: the next offer from `peer` for `slot` (`TransferKey.slot`)."""

    def answer(self, peer: Endpoint, answer: Go | Reject, timeout: float) -> None:
        """Receiver: reply to the offer of `answer.key`."""


@dataclass(frozen=True, slots=True)
class NcclConfig:
    endpoint: Endpoint
    budget_bytes: int = 1 << 30
    comm_bytes: int = 128 << 20  # NCCL's buffers for one peer-to-peer communicator, with default settings
    control_timeout_s: float = 5.0  # a control message the peer has not taken by then: the link is broken


@dataclass(eq=False)
class _Comm:
    """One generation of one pair's communicator, its dedicated stream and its sequence state."""

    generation: int
    built: threading.Event = field(default_factory=threading.Event)
    cond: threading.Condition = field(default_factory=threading.Condition)
    handle: Communicator | None = None  # once built
    maker_generation: int = -1
    error: str = ""  # why it is unusable (failed build, aborted)
    next_seq: int = 0  # receiver
    order: SendOrder | None = None  # sender
    outgoing: dict[TransferKey, tuple[list[tuple[int, int]], Any]] = field(default_factory=dict)
    issued: dict[TransferKey, Pending] = field(default_factory=dict)  # key -> its operations' completion


class NcclLink:
    """This worker's NCCL links to all its peers: a sender's (prefill) or a receiver's (decode)."""

    def __init__(self, config: NcclConfig, control: Control, backend: Backend) -> None:
        self.config = config
        self._control = control
        self._backend = backend
        self._pool = CommPool(PoolConfig(config.budget_bytes, config.comm_bytes))
        self._comms: dict[tuple[str, int], _Comm] = {}
        self._seen: dict[str, int] = {}  # receiver: the newest maker generation joined, per peer
        self._paths: dict[Endpoint, str] = {}
        self._lock = threading.Lock()

    def send(self, peer: Endpoint, key: TransferKey, buffers: Sequence[Any], timeout: float, after: Any = None) -> None:
        deadline = time.monotonic() + timeout
        spans = self._backend.spans(buffers)
        comm, lease = self._acquire(peer, deadline, SENDER_RANK)
        try:
            offer = Offer(key, tuple(n for _, n in spans), comm.maker_generation)
            answer = self._control.offer(peer, offer, _left(deadline))
            if isinstance(answer, Reject):
                self._rejected(answer, lease, offer.nbytes, SENDER_RANK)
            with comm.cond:
                comm.outgoing[key] = (spans, after)
                assert comm.order is not None
                try:
                    due = comm.order.add(answer)  # type: ignore[arg-type]  # a Reject returned above
                except OutOfOrder as exc:
                    comm.outgoing.pop(key)
                    self._tear_down(Evict(peer, lease.generation, abort=True), str(exc))
                    raise PeerGone(f"the link to {peer} fell out of step: {exc}") from exc
                for go in due:
                    comm.issued[go.key] = self._issue(comm, go, SENDER_RANK)
                comm.cond.notify_all()
                while key not in comm.issued and not comm.error:
                    if not comm.cond.wait(_left(deadline)):
                        self._fail_late(lease, "the operations before it were never announced")
                pending = comm.issued.pop(key, None)
            self._wait(comm, lease, pending, deadline)
        finally:
            self._pool.release(lease, time.monotonic())

    def recv(self, peer: Endpoint, key: TransferKey, into: Sequence[Any], timeout: float) -> int:
        deadline = time.monotonic() + timeout
        spans = self._backend.spans(into)
        expect = Expect(key, tuple(n for _, n in spans), deadline)
        offer: Offer | None = None
        while True:
            comm, lease = self._acquire(peer, deadline, RECEIVER_RANK)
            try:
                offer = offer or self._control.next_offer(peer, key.slot, _left(deadline))
                if self._pool.observe(peer.instance_id, offer.maker_generation) is not None:
                    self._tear_down(Evict(peer, lease.generation, abort=True), "the sender built a new communicator")
                    continue  # join the sender's new communicator, then answer the same offer
                with comm.cond:
                    answer = match(expect, offer, comm.maker_generation, comm.next_seq, time.monotonic())
                    if isinstance(answer, Go):
                        comm.next_seq += 1
                        comm.outgoing[key] = (spans, None)
                        pending = self._issue(comm, answer, RECEIVER_RANK)
                self._control.answer(peer, answer, _left(deadline))
                if isinstance(answer, Reject):
                    if answer.code is RejectCode.EPOCH:
                        offer = None  # another incarnation's send: refused; the right one may still come
                        continue
                    self._rejected(answer, lease, offer.nbytes, RECEIVER_RANK)
                self._wait(comm, lease, pending, deadline)
                return expect.nbytes
            finally:
                self._pool.release(lease, time.monotonic())

    def pairs(self) -> list[PairView]:
        """The pool's communicators, one per peer (generation, state, transfers in flight)."""
        with self._lock:
            return self._pool.pairs()

    def sweep(self) -> int:
        """Abort every communicator with a transfer past its deadline; returns how many."""
        with self._lock:
            aborts = self._pool.overdue(time.monotonic())
        for abort in aborts:
            self._tear_down(Evict(abort.peer, abort.generation, abort=True), abort.reason)
        return len(aborts)

    def reset(self, peer: Endpoint, reason: str, maker_generation: int | None = None) -> None:
        """Abort the communicator to `peer` (only if built from `maker_generation`, when given): the control plane
        reports that the other side gave up a transfer on it (its stream may hold an operation that will never be
        matched). The next transfer rebuilds."""
        for view in self.pairs():
            if view.peer.instance_id != peer.instance_id or view.state is CommState.BROKEN:
                continue
            if maker_generation is None or view.maker_generation == maker_generation:
                self._tear_down(Evict(view.peer, view.generation, abort=True), reason)

    def maker_generation(self, peer: Endpoint) -> int:
        """The sender's generation of the communicator to `peer`, live or broken (-1: none built)."""
        return next((v.maker_generation for v in self.pairs() if v.peer.instance_id == peer.instance_id), -1)

    def close(self) -> None:
        for view in self._pool.pairs():
            with self._lock:
                gone = self._pool.drop(view.peer.instance_id)
            if gone is not None:
                self._tear_down(gone, "the link was closed locally")

    def _acquire(self, peer: Endpoint, deadline: float, rank: int) -> tuple[_Comm, Lease]:
        self._check_path(peer, deadline)
        with self._lock:
            decision = self._pool.acquire(peer, deadline, time.monotonic())
            if isinstance(decision, Refuse):
                raise PoolExhausted(decision.reason)
            lease = decision.lease
            comm = self._comms.setdefault((peer.instance_id, lease.generation), _Comm(lease.generation))
        if isinstance(decision, Create):
            for gone in decision.evict:
                self._tear_down(gone, "evicted to make room" if not gone.abort else "the peer restarted")
            self._build(comm, peer, rank, deadline)
        elif not comm.built.wait(_left(deadline)):
            self._pool.release(lease, time.monotonic())
            raise TransportTimeout(f"the communicator to {peer} was not built in time")
        if comm.error:
            self._pool.release(lease, time.monotonic())
            raise PeerGone(f"the communicator to {peer} is unusable: {comm.error}")
        return comm, lease

    def _build(self, comm: _Comm, peer: Endpoint, rank: int, deadline: float) -> None:
        try:
            if rank == SENDER_RANK:
                uid = self._backend.new_id()
                maker, uid = self._control.exchange_id(peer, comm.generation, uid, _left(deadline))
            else:
                maker, uid = self._control.exchange_id(peer, self._seen.get(peer.instance_id, 0), None, _left(deadline))
                self._seen[peer.instance_id] = maker
            comm.handle = self._backend.join(uid, rank, _left(deadline))
            comm.maker_generation = maker
            comm.order = SendOrder(maker) if rank == SENDER_RANK else None
            with self._lock:
                fresh = self._pool.created(peer.instance_id, comm.generation, maker)
            if not fresh:
                comm.error = "superseded while it was being built"
        except TransportError as exc:
            comm.error = str(exc)
            with self._lock:
                self._pool.abort(peer.instance_id, comm.generation, comm.error)
        finally:
            comm.built.set()

    def _issue(self, comm: _Comm, go: Go, rank: int) -> Pending:
        """Put `go`'s operations on the communicator (caller holds `comm.cond`)."""
        assert comm.handle is not None
        spans, after = comm.outgoing.pop(go.key)
        chunks = split(spans, go.chunks)
        return comm.handle.send(chunks, after) if rank == SENDER_RANK else comm.handle.recv(chunks)

    def _wait(self, comm: _Comm, lease: Lease, pending: Pending | None, deadline: float) -> None:
        if pending is None or comm.error:
            raise PeerGone(f"the communicator to {lease.peer} was aborted: {comm.error}")
        try:
            finished = pending.wait(_left(deadline))
        except CommFailed as exc:
            self._tear_down(Evict(lease.peer, lease.generation, abort=True), str(exc))
            raise PeerGone(f"the link to {lease.peer} failed: {comm.error or exc}") from exc
        if not finished:
            self._fail_late(lease, "its operations did not complete")
        if comm.error:  # aborted under us: the operations stopped early, the bytes are not all there
            raise PeerGone(f"the communicator to {lease.peer} was aborted: {comm.error}")

    def _fail_late(self, lease: Lease, what: str) -> None:
        self._tear_down(Evict(lease.peer, lease.generation, abort=True), f"a transfer passed its deadline: {what}")
        raise TransportTimeout(f"the transfer to or from {lease.peer} passed its deadline: {what}")

    def _rejected(self, answer: Reject, lease: Lease, sent: int, rank: int) -> None:
        if answer.code is RejectCode.SIZE:
            raise SizeMismatch(answer.key.encode(), sent, answer.posted)
        if answer.code is RejectCode.DEADLINE:
            raise TransportTimeout(answer.reason)
        if answer.code is RejectCode.COMM and rank == SENDER_RANK:
            # A receiver on a newer communicator would have joined ours (`observe`): the sender's is the old one.
            self._tear_down(Evict(lease.peer, lease.generation, abort=True), answer.reason)
        raise PeerGone(f"{lease.peer} refused {answer.key}: {answer.reason}")

    def _tear_down(self, gone: Evict, reason: str) -> None:
        with self._lock:
            if gone.abort:
                self._pool.abort(gone.peer.instance_id, gone.generation, reason)
            comm = self._comms.pop((gone.peer.instance_id, gone.generation), None)
        if comm is None:
            return
        with comm.cond:
            comm.error = comm.error or reason
            comm.cond.notify_all()
        if comm.handle is None:
            return
        if gone.abort:
            comm.handle.abort()
        else:
            comm.handle.destroy()

    def _check_path(self, peer: Endpoint, deadline: float) -> None:
        path = self._paths.get(peer)
        if path is None:
            local = self._backend.device_uuid()
            path = self._paths[peer] = choose_path(local, self._control.device_of(peer, _left(deadline)))
        if path == "same-device":
            raise SameDevice(
                f"{self.config.endpoint} and {peer} share one device, which NCCL refuses; the CUDA IPC path for "
                "such pairs is not implemented: route them to the shm or tcp transport"
            )


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)
