"""`CupyBackend`: the `Communicator` interface over `cupy.cuda.nccl`, the only part of the NCCL transport that
needs a GPU (everything above it runs on CPUs over `socket_comm`).

cupy is imported at first use, so this module imports on hosts without a GPU; `NcclUnavailable` names what is
missing when it is used there. Each communicator owns one non-blocking stream; a `Pending` is a CUDA event
recorded after its operations, polled (cupy has no blocking wait with a timeout) together with NCCL's async error.

Known limit: cupy exposes only the blocking `ncclCommInitRank`. `join` runs it on its own thread and gives up at
its timeout, but a peer that never joins keeps that thread inside NCCL until the process exits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from kv_transfer.communicator import CommFailed, Span
from kv_transfer.transport import PeerGone, TransportError, TransportTimeout

POLL_S = 0.0002  # how often a wait looks at its CUDA event


class NcclUnavailable(TransportError):
    """cupy, NCCL or a GPU is missing on this host."""


def id_to_bytes(unique_id: Sequence[int]) -> bytes:
    """cupy's unique id (128 C chars, signed) as bytes for the wire."""
    return bytes(b & 0xFF for b in unique_id)


def id_from_bytes(raw: bytes) -> tuple[int, ...]:
    return tuple(b - 256 if b > 127 else b for b in raw)


def device_spans(buffers: Sequence[Any], device: int) -> list[Span]:
    """(address, bytes) of each C-contiguous device buffer (`__cuda_array_interface__`), in order."""
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


class _Event:
    __slots__ = ("_comm", "_event")

    def __init__(self, comm: CupyComm, event: Any) -> None:
        self._comm, self._event = comm, event

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self._comm.check()
            if self._event.done:
                self._comm.check()  # an abort stops the kernels early: the bytes are not all there
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)  # the polling period of a CUDA event, not a synchronization


class CupyComm:
    def __init__(self, handle: Any, device: int) -> None:
        cupy, _ = _cupy()
        self._handle, self._device, self._error = handle, device, ""
        with cupy.cuda.Device(device):
            self._stream = cupy.cuda.Stream(non_blocking=True)

    def send(self, chunks: Sequence[Span], after: Any) -> _Event:
        return self._issue(chunks, after, send=True)

    def recv(self, chunks: Sequence[Span]) -> _Event:
        return self._issue(chunks, None, send=False)

    def check(self) -> None:
        if self._error:
            raise CommFailed(self._error)
        try:
            self._handle.check_async_error()
        except Exception as exc:  # cupy's NcclError: the link is broken
            self._error = f"NCCL error: {exc}"
            raise CommFailed(self._error) from exc

    def abort(self) -> None:
        if not self._error:
            self._error = "the communicator was aborted"
            self._handle.abort()

    def destroy(self) -> None:
        if not self._error:
            self._error = "the communicator was destroyed"
            self._handle.destroy()

    def _issue(self, chunks: Sequence[Span], after: Any, send: bool) -> _Event:
        cupy, nccl = _cupy()
        self.check()
        op, other = (self._handle.send, 1) if send else (self._handle.recv, 0)
        with cupy.cuda.Device(self._device):
            if after is not None:
                self._stream.wait_event(after)
            nccl.groupStart()
            for address, nbytes in chunks:
                op(address, nbytes, nccl.NCCL_UINT8, other, self._stream.ptr)
            nccl.groupEnd()
            event = cupy.cuda.Event(disable_timing=True)
            event.record(self._stream)
        return _Event(self, event)


class CupyBackend:
    """NCCL communicators on GPU `device` of this process."""

    def __init__(self, device: int) -> None:
        self.device = device

    def device_uuid(self) -> str:
        cupy, _ = _cupy()
        try:
            return bytes(cupy.cuda.runtime.getDeviceProperties(self.device)["uuid"]).hex()
        except Exception as exc:  # cupy's CUDARuntimeError: no driver or no such device
            raise NcclUnavailable(f"no usable GPU {self.device}: {exc}") from exc

    def new_id(self) -> bytes:
        _, nccl = _cupy()
        return id_to_bytes(nccl.get_unique_id())

    def join(self, unique_id: bytes, rank: int, timeout: float) -> CupyComm:
        cupy, nccl = _cupy()
        return CupyComm(_init_comm(cupy, nccl, (id_from_bytes(unique_id), rank, self.device), timeout), self.device)

    def spans(self, buffers: Sequence[Any]) -> list[Span]:
        return device_spans(buffers, self.device)


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
