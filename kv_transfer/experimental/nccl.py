"""The `nccl` transport: one layer of KV at a time from a prefill GPU straight into a decode GPU's KV blocks.

A thin shell over `nccl_pool` and `nccl_keys`: the pool decides which communicators live, the matching rules
decide what goes on the wire; this module turns those decisions into `cupy.cuda.nccl` calls. cupy is imported
at first use, so this module imports on hosts without a GPU; `NcclUnavailable` names what is missing when it is
used there.

    link = NcclLink(NcclConfig(endpoint, device=0), control)
    link.send(decode, TransferKey(rid, my_epoch, layer), [kv_views...], timeout, after=forward_done)   # prefill
    link.recv(prefill, TransferKey(rid, prefill.epoch, layer), [block_views...], timeout)             # decode

Contract (the `Transport` one, for device buffers, one way):
- Buffers are C-contiguous device arrays (anything with `__cuda_array_interface__`: cupy arrays, torch CUDA
  tensors) on this link's device; a message is their concatenation, received scattered across `into`.
- `send` returns once NCCL has read the buffers (the caller may then free the KV blocks); `recv` returns the
  byte count once they have landed. Both run on one dedicated stream per communicator; `after` (a CUDA event
  recorded where the KV was written) orders the send behind the forward pass that wrote it.
- Communicators are made on first use per peer (the sender makes the unique id and hands it over through
  `Control.exchange_id`), kept under the pool's memory budget, and the least recently used idle ones destroyed.
- A transfer past its deadline, or an NCCL error, aborts the whole communicator (`ncclCommAbort`): every
  transfer in flight on it fails (`TransportTimeout` for the late one, `PeerGone` for the rest) and the next
  transfer builds a new generation with a new id. Nothing is ever left posted on a dead communicator, so the
  caller's ticket fails through the usual protocol and frees its blocks.
- A peer on the same GPU cannot be reached (NCCL refuses two ranks on one device): `SameDevice`, raised before
  anything is built; the caller routes such pairs to a CPU transport (`choose_path`).

Known limit: cupy exposes only the blocking `ncclCommInitRank`. The build runs on its own thread and the caller
gives up at its deadline, but a peer that never joins keeps that thread inside NCCL until the process exits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kv_transfer.endpoint import Endpoint
from kv_transfer.experimental.nccl_keys import (
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
from kv_transfer.experimental.nccl_pool import CommPool, CommState, Create, Evict, Lease, PoolConfig, Refuse
from kv_transfer.transport import PeerGone, SizeMismatch, TransportError, TransportTimeout


class NcclUnavailable(TransportError):
    """cupy, NCCL or a GPU is missing on this host."""


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
    device: int
    budget_bytes: int = 1 << 30
    comm_bytes: int = 128 << 20  # NCCL's buffers for one peer-to-peer communicator, with default settings
    poll_s: float = 0.0002  # how often a wait looks at its CUDA event


def id_to_bytes(unique_id: Sequence[int]) -> bytes:
    """cupy's unique id (128 C chars, signed) as bytes for the wire."""
    return bytes(b & 0xFF for b in unique_id)


def id_from_bytes(raw: bytes) -> tuple[int, ...]:
    return tuple(b - 256 if b > 127 else b for b in raw)


def device_spans(buffers: Sequence[Any], device: int) -> list[tuple[int, int]]:
    """(address, bytes) of each C-contiguous device buffer, in order."""
    spans = []
    for buf in buffers:
        face = buf.__cuda_array_interface__
        shape, strides = tuple(face["shape"]), face.get("strides")
        itemsize = int(face["typestr"][2:])
        nbytes = itemsize
        for dim in shape:
            nbytes *= dim
        if strides is not None and nbytes and tuple(strides) != _c_strides(shape, itemsize):
            raise ValueError("nccl transport buffers must be C-contiguous")
        dev = getattr(buf, "device", None)
        index = getattr(dev, "index", getattr(dev, "id", device))
        if index is not None and index != device:
            raise ValueError(f"a buffer is on device {index}, the link on device {device}")
        spans.append((int(face["data"][0]), nbytes))
    return spans


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def _cupy() -> tuple[Any, Any]:
    try:
        import cupy
        from cupy.cuda import nccl
    except ImportError as exc:
        raise NcclUnavailable(f"the nccl transport needs cupy-cuda12x and nvidia-nccl-cu12 ({exc})") from exc
    if not getattr(nccl, "available", False):
        raise NcclUnavailable("cupy was built without NCCL")
    return cupy, nccl


@dataclass(eq=False)
class _Comm:
    """One generation of one pair's communicator, its dedicated stream and its sequence state."""

    generation: int
    built: threading.Event = field(default_factory=threading.Event)
    cond: threading.Condition = field(default_factory=threading.Condition)
    handle: Any = None  # cupy's NcclCommunicator, once built
    stream: Any = None
    maker_generation: int = -1
    error: str = ""  # why it is unusable (failed build, aborted)
    next_seq: int = 0  # receiver
    order: SendOrder | None = None  # sender
    outgoing: dict[TransferKey, tuple[list[tuple[int, int]], Any]] = field(default_factory=dict)
    issued: dict[TransferKey, Any] = field(default_factory=dict)  # key -> CUDA event after its operations


class NcclLink:
    """This worker's NCCL links to all its peers: a sender's (prefill) or a receiver's (decode)."""

    def __init__(self, config: NcclConfig, control: Control) -> None:
        self.config = config
        self._control = control
        self._pool = CommPool(PoolConfig(config.budget_bytes, config.comm_bytes))
        self._comms: dict[tuple[str, int], _Comm] = {}
        self._seen: dict[str, int] = {}  # receiver: the newest maker generation joined, per peer
        self._paths: dict[Endpoint, str] = {}
        self._lock = threading.Lock()

    def send(self, peer: Endpoint, key: TransferKey, buffers: Sequence[Any], timeout: float, after: Any = None) -> None:
        deadline = time.monotonic() + timeout
        spans = device_spans(buffers, self.config.device)
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
                event = comm.issued.pop(key, None)
            self._wait(comm, lease, event, deadline)
        finally:
            self._pool.release(lease, time.monotonic())

    def recv(self, peer: Endpoint, key: TransferKey, into: Sequence[Any], timeout: float) -> int:
        deadline = time.monotonic() + timeout
        spans = device_spans(into, self.config.device)
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
                        event = self._issue(comm, answer, RECEIVER_RANK)
                self._control.answer(peer, answer, _left(deadline))
                if isinstance(answer, Reject):
                    if answer.code is RejectCode.EPOCH:
                        offer = None  # another incarnation's send: refused; the right one may still come
                        continue
                    self._rejected(answer, lease, offer.nbytes, RECEIVER_RANK)
                self._wait(comm, lease, event, deadline)
                return expect.nbytes
            finally:
                self._pool.release(lease, time.monotonic())

    def sweep(self) -> int:
        """Abort every communicator with a transfer past its deadline; returns how many."""
        with self._lock:
            aborts = self._pool.overdue(time.monotonic())
        for abort in aborts:
            self._tear_down(Evict(abort.peer, abort.generation, abort=True), abort.reason)
        return len(aborts)

    def reset(self, peer: Endpoint, reason: str) -> None:
        """Abort the communicator to `peer`: the control plane reports that the other side gave up a transfer
        on it (its stream may hold an operation that will never be matched). The next transfer rebuilds."""
        for view in self._pool.pairs():
            if view.peer.instance_id == peer.instance_id and view.state is not CommState.BROKEN:
                self._tear_down(Evict(view.peer, view.generation, abort=True), reason)

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
            cupy, nccl = _cupy()
            if rank == SENDER_RANK:
                uid = id_to_bytes(nccl.get_unique_id())
                maker, uid = self._control.exchange_id(peer, comm.generation, uid, _left(deadline))
            else:
                maker, uid = self._control.exchange_id(peer, self._seen.get(peer.instance_id, 0), None, _left(deadline))
                self._seen[peer.instance_id] = maker
            comm.handle = _init_comm(cupy, nccl, (id_from_bytes(uid), rank, self.config.device), _left(deadline))
            with cupy.cuda.Device(self.config.device):
                comm.stream = cupy.cuda.Stream(non_blocking=True)
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

    def _issue(self, comm: _Comm, go: Go, rank: int) -> Any:
        """Put `go`'s operations on the stream (caller holds `comm.cond`); returns the event after them."""
        cupy, nccl = _cupy()
        spans, after = comm.outgoing.pop(go.key)
        other = RECEIVER_RANK if rank == SENDER_RANK else SENDER_RANK
        op = comm.handle.send if rank == SENDER_RANK else comm.handle.recv
        with cupy.cuda.Device(self.config.device):
            if after is not None:
                comm.stream.wait_event(after)
            nccl.groupStart()
            for address, nbytes in split(spans, go.chunks):
                op(address, nbytes, nccl.NCCL_UINT8, other, comm.stream.ptr)
            nccl.groupEnd()
            event = cupy.cuda.Event(disable_timing=True)
            event.record(comm.stream)
        return event

    def _wait(self, comm: _Comm, lease: Lease, event: Any, deadline: float) -> None:
        while event is None or not event.done:
            if comm.error or event is None:
                raise PeerGone(f"the communicator to {lease.peer} was aborted: {comm.error}")
            if time.monotonic() >= deadline:
                self._fail_late(lease, "its operations did not complete")
            try:
                comm.handle.check_async_error()
            except Exception as exc:  # cupy's NcclError: the link is broken
                self._tear_down(Evict(lease.peer, lease.generation, abort=True), f"NCCL error: {exc}")
                raise PeerGone(f"the link to {lease.peer} failed: {exc}") from exc
            time.sleep(self.config.poll_s)  # the polling period of a CUDA event, not a synchronization
        if comm.error:  # aborted under us: the kernels stopped early, the bytes are not all there
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
            local = device_uuid(self.config.device)
            path = self._paths[peer] = choose_path(local, self._control.device_of(peer, _left(deadline)))
        if path == "same-device":
            raise SameDevice(
                f"{self.config.endpoint} and {peer} share one GPU, which NCCL refuses; the CUDA IPC path for "
                "such pairs is not implemented: route them to the shm or tcp transport"
            )


def device_uuid(device: int) -> str:
    cupy, _ = _cupy()
    try:
        return bytes(cupy.cuda.runtime.getDeviceProperties(device)["uuid"]).hex()
    except Exception as exc:  # cupy's CUDARuntimeError: no driver or no such device
        raise NcclUnavailable(f"no usable GPU {device}: {exc}") from exc


def _init_comm(cupy: Any, nccl: Any, args: tuple[tuple[int, ...], int, int], timeout: float) -> Any:
    """`ncclCommInitRank` for a pair, given up on after `timeout` (see the module docstring's known limit)."""
    uid, rank, device = args
    lock, done = threading.Lock(), threading.Event()
    box: dict[str, Any] = {"abandoned": False}

    def run() -> None:
        try:
            with cupy.cuda.Device(device):
                handle = nccl.NcclCommunicator(2, uid, rank)
        except Exception as exc:  # cupy's NcclError
            box["error"] = exc
            done.set()
            return
        with lock:
            if box["abandoned"]:
                handle.abort()
            else:
                box["comm"] = handle
                done.set()

    threading.Thread(target=run, name="pdkv-nccl-init", daemon=True).start()
    done.wait(max(timeout, 0.0))
    with lock:
        if "comm" in box:
            return box["comm"]
        if "error" in box:
            raise PeerGone(f"ncclCommInitRank failed: {box['error']}")
        box["abandoned"] = True
    raise TransportTimeout(f"the peer did not join the communicator within {timeout:g}s")


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)
