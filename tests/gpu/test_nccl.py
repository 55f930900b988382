"""The `nccl` transport on real GPUs: bytes exchanged between two processes, a stalled peer aborted and rebuilt,
and bandwidth against a raw device-to-device copy.

What runs where: NCCL refuses two ranks on one GPU, so every test that moves bytes through NCCL needs two GPUs
(one process per GPU). On a single GPU only the same-device refusal and the raw-copy baseline of the bandwidth
helper run; the others are skipped with that reason. Without a GPU (or without cupy) everything is skipped.
The two processes talk over `QueueControl`, a stand-in for the authenticated control plane.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from typing import Any

import pytest

from kv_transfer.cupy_comm import CupyBackend
from kv_transfer.endpoint import Endpoint
from kv_transfer.nccl import NcclConfig, NcclLink, SameDevice
from kv_transfer.nccl_keys import Go, Offer, Reject, TransferKey
from kv_transfer.transport import TransportTimeout


def _gpus() -> tuple[int, str]:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount()), ""
    except ImportError:
        return 0, "cupy is not installed (pip install 'pdserve[gpu]')"
    except Exception as exc:  # no driver, no device
        return 0, f"no usable CUDA device ({exc})"


GPUS, WHY = _gpus()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS < 1, reason=f"needs an NVIDIA GPU: {WHY}")]
two_gpus = pytest.mark.skipif(1 <= GPUS < 2, reason="NCCL refuses two ranks on one GPU: needs two GPUs")

PREFILL, DECODE = Endpoint("prefill-0", 1), Endpoint("decode-0", 1)
LAYERS, LAYER_BYTES = 4, 16 << 20  # 16 MiB per layer: the KV of a long prompt in a small model


class QueueControl:
    """The control plane between the two test processes: one queue per kind of message and direction."""

    def __init__(self, queues: dict[str, Any], devices: dict[str, str]) -> None:
        self.q = queues
        self.devices = devices

    def device_of(self, peer: Endpoint, timeout: float) -> str:
        return self.devices[peer.instance_id]

    def exchange_id(
        self, peer: Endpoint, generation: int, unique_id: bytes | None, timeout: float
    ) -> tuple[int, bytes]:
        if unique_id is not None:
            self.q["ids"].put((generation, unique_id))
            return generation, unique_id
        while True:
            got, uid = self._get("ids", timeout)
            if got > generation:
                return got, uid

    def offer(self, peer: Endpoint, offer: Offer, timeout: float) -> Go | Reject:
        self.q["offers"].put(offer)
        answer: Go | Reject = self._get("answers", timeout)
        return answer

    def next_offer(self, peer: Endpoint, slot: bytes, timeout: float) -> Offer:
        offer: Offer = self._get("offers", timeout)
        assert offer.key.slot == slot, (offer.key, slot)
        return offer

    def _get(self, name: str, timeout: float) -> Any:
        try:
            return self.q[name].get(timeout=max(timeout, 0.01))
        except queue.Empty:
            raise TransportTimeout(f"no {name} message within {timeout:g}s") from None

    def answer(self, peer: Endpoint, answer: Go | Reject, timeout: float) -> None:
        self.q["answers"].put(answer)


def _pattern(cupy: Any, layer: int, nbytes: int) -> Any:
    return ((cupy.arange(nbytes, dtype=cupy.uint32) * 7 + layer) % 251).astype(cupy.uint8)


def _sender(device: int, control: QueueControl, plan: dict[str, Any], out: Any) -> None:
    import cupy

    try:
        link = NcclLink(NcclConfig(PREFILL), control, CupyBackend(device))
        with cupy.cuda.Device(device):
            for attempt, stall in enumerate(plan["stall"]):
                for layer in range(LAYERS):
                    key = TransferKey(f"req-{attempt}", PREFILL.epoch, layer)
                    data = _pattern(cupy, layer, LAYER_BYTES)
                    if stall and layer == 1:
                        # Announce on the communicator layer 0 built (generation 1), take the go, never send:
                        # the receiver must give up alone at its deadline; then the ticket protocol tells us.
                        control.offer(DECODE, Offer(key, (LAYER_BYTES,), 1), 5.0)
                        control.q["events"].get(timeout=60)
                        link.reset(DECODE, "the receiver aborted the transfer")
                        break
                    link.send(DECODE, key, [data], timeout=30.0)
            out.put(("sender", "ok"))
            link.close()
    except Exception as exc:
        out.put(("sender", f"{type(exc).__name__}: {exc}"))


def _receiver(device: int, control: QueueControl, plan: dict[str, Any], out: Any) -> None:
    import cupy

    try:
        link = NcclLink(NcclConfig(DECODE), control, CupyBackend(device))
        results = []
        with cupy.cuda.Device(device):
            for attempt in range(len(plan["stall"])):
                for layer in range(LAYERS):
                    key = TransferKey(f"req-{attempt}", PREFILL.epoch, layer)
                    # Three destination spans that cut the message elsewhere than the sender's one buffer.
                    sizes = (LAYER_BYTES // 4, LAYER_BYTES // 2, LAYER_BYTES // 4)
                    parts = [cupy.empty(n, dtype=cupy.uint8) for n in sizes]
                    start = time.monotonic()
                    try:
                        link.recv(PREFILL, key, parts, timeout=plan["deadline_s"])
                    except TransportTimeout:
                        results.append(("timeout", time.monotonic() - start))
                        control.q["events"].put("gave up")
                        break
                    same = bool((cupy.concatenate(parts) == _pattern(cupy, layer, LAYER_BYTES)).all())
                    results.append(("landed" if same else "corrupt", time.monotonic() - start))
        out.put(("receiver", results))
        link.close()
    except Exception as exc:
        out.put(("receiver", f"{type(exc).__name__}: {exc}"))


def _run_pair(plan: dict[str, Any]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    queues = {name: manager.Queue() for name in ("ids", "offers", "answers", "events")}
    devices = {PREFILL.instance_id: CupyBackend(0).device_uuid(), DECODE.instance_id: CupyBackend(1).device_uuid()}
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_sender, args=(0, QueueControl(queues, devices), plan, out)),
        ctx.Process(target=_receiver, args=(1, QueueControl(queues, devices), plan, out)),
    ]
    for proc in procs:
        proc.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    manager.shutdown()
    return results


@two_gpus
def test_two_ranks_exchange_kv_sized_buffers_byte_for_byte() -> None:
    results = _run_pair({"stall": [False], "deadline_s": 30.0})
    assert results["sender"] == "ok"
    assert [outcome for outcome, _ in results["receiver"]] == ["landed"] * LAYERS


@two_gpus
def test_a_stalled_peer_is_aborted_within_its_deadline_and_the_pair_rebuilt() -> None:
    results = _run_pair({"stall": [True, False], "deadline_s": 3.0})
    assert results["sender"] == "ok"
    outcomes = [outcome for outcome, _ in results["receiver"]]
    assert outcomes == ["landed", "timeout"] + ["landed"] * LAYERS  # a new generation carried the next request
    waited = results["receiver"][1][1]
    assert 3.0 <= waited < 3.0 + 2.0  # aborted at its deadline, not hung


def test_a_pair_on_one_gpu_is_refused_before_anything_is_built() -> None:
    same = {PREFILL.instance_id: CupyBackend(0).device_uuid(), DECODE.instance_id: CupyBackend(0).device_uuid()}
    link = NcclLink(NcclConfig(PREFILL), QueueControl({}, same), CupyBackend(0))
    import cupy

    with pytest.raises(SameDevice, match="one device"):
        link.send(DECODE, TransferKey("r", 1, 0), [cupy.zeros(16, dtype=cupy.uint8)], timeout=1.0)
    assert link.pairs() == []  # nothing reserved in the budget


def raw_copy_gbps(nbytes: int, repeats: int = 20, device: int = 0) -> float:
    """The baseline: a device-to-device copy of `nbytes` on one GPU, in GB/s (median of `repeats`)."""
    import cupy

    with cupy.cuda.Device(device):
        src, dst = cupy.ones(nbytes, dtype=cupy.uint8), cupy.empty(nbytes, dtype=cupy.uint8)
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        times = []
        for _ in range(repeats):
            start.record()
            cupy.copyto(dst, src)
            end.record()
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
    return nbytes / sorted(times)[len(times) // 2] / 1e9


def nccl_gbps(layer_bytes: int) -> float:
    """The transport: `LAYERS` layers of `layer_bytes` between two GPUs, in GB/s as the receiver saw them."""
    results = _run_pair({"stall": [False], "deadline_s": 60.0})
    times = [t for outcome, t in results["receiver"] if outcome == "landed"]
    assert len(times) == LAYERS, results
    return layer_bytes * len(times[1:]) / sum(times[1:]) / 1e9  # the first layer pays for building the pair


def test_raw_copy_baseline_runs_on_one_gpu() -> None:
    assert raw_copy_gbps(64 << 20, repeats=5) > 0


@two_gpus
def test_bandwidth_against_a_raw_device_copy(capsys: pytest.CaptureFixture[str]) -> None:
    """Reports, never asserts a speed: the ratio is for the person reading the output."""
    raw, nccl = raw_copy_gbps(LAYER_BYTES), nccl_gbps(LAYER_BYTES)
    with capsys.disabled():
        print(f"\nnccl {nccl:.1f} GB/s, raw device copy {raw:.1f} GB/s, ratio {nccl / raw:.2f}")
    assert nccl > 0
