"""The NCCL transport's whole logic (transport shell, control plane, pool, keys, abort and rebuild) on CPUs: the
communicators are `SocketBackend`'s, the control links real authenticated tcp links on loopback."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from kv_transfer.endpoint import Endpoint
from kv_transfer.nccl import NcclConfig
from kv_transfer.nccl_keys import Go, Offer, TransferKey
from kv_transfer.nccl_pool import CommState
from kv_transfer.nccl_transport import NcclPlane, NcclTransport, connect, listen
from kv_transfer.params import layer_key
from kv_transfer.socket_comm import SocketBackend
from kv_transfer.transport import PeerGone, SizeMismatch, TransportConfig, TransportTimeout

PREFILL, DECODE = Endpoint("prefill-0", 3), Endpoint("decode-0", 1)
SECRET = b"s" * 32


@dataclass
class Pair:
    prefill: NcclPlane
    decode: NcclPlane
    out: NcclTransport  # the prefill's link
    inc: NcclTransport  # the decode's link


def _plane(me: Endpoint) -> NcclPlane:
    return NcclPlane(NcclConfig(me, budget_bytes=4 << 20, comm_bytes=1 << 20), SocketBackend())


@pytest.fixture
def pair() -> Iterator[Pair]:
    prefill, decode = _plane(PREFILL), _plane(DECODE)
    with listen(TransportConfig(DECODE, SECRET), decode) as listener:
        box: dict[str, object] = {}
        accepter = threading.Thread(target=lambda: box.update(link=listener.accept(5.0)))
        accepter.start()
        out = connect(listener.address, TransportConfig(PREFILL, SECRET), prefill, 5.0)
        accepter.join()
    inc = box["link"]
    assert isinstance(out, NcclTransport) and isinstance(inc, NcclTransport)
    yield Pair(prefill, decode, out, inc)
    for link in (out, inc):
        link.close()
    prefill.close()
    decode.close()


def _layer(i: int, n: int) -> bytearray:
    return bytearray((j * 7 + i) % 251 for j in range(n))


def _in_thread(fn: object) -> tuple[threading.Thread, dict[str, object]]:
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = fn()  # type: ignore[operator]
        except Exception as exc:
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def _send_layers(p: Pair, transfer: str, layers: list[bytearray], timeout: float = 5.0) -> dict[str, object]:
    thread, box = _in_thread(lambda: [p.out.send(layer_key(transfer, i), [memoryview(d)], timeout)
                                      for i, d in enumerate(layers)])
    box["thread"] = thread
    return box


def _receive(p: Pair, transfer: str, sizes: list[tuple[int, ...]], timeout: float = 5.0) -> list[bytearray]:
    """Post every layer, scattered over spans of `sizes`, then wait for each; the layers' bytes, joined."""
    parts = [[bytearray(n) for n in layer] for layer in sizes]
    for i, layer in enumerate(parts):
        p.inc.expect(layer_key(transfer, i), [memoryview(b) for b in layer])
    for i in range(len(parts)):
        assert p.inc.wait(layer_key(transfer, i), timeout) == sum(sizes[i])
    return [bytearray(b"".join(layer)) for layer in parts]


def _states(plane: NcclPlane) -> list[tuple[int, CommState, int]]:
    return [(v.generation, v.state, v.leases) for v in plane.link.pairs()]


def test_layers_move_byte_for_byte_over_a_communicator_built_on_first_use(pair: Pair) -> None:
    assert _states(pair.prefill) == [] and _states(pair.decode) == []  # nothing built up front
    layers = [_layer(i, 3000 + i) for i in range(3)]
    box = _send_layers(pair, "t1", layers)
    # The receiver cuts each layer elsewhere than the sender's one buffer.
    got = _receive(pair, "t1", [(1000, 2000), (3001,), (1, 2, 2999)])
    box["thread"].join(5.0)  # type: ignore[union-attr]
    assert "error" not in box and got == layers
    assert _states(pair.prefill) == [(1, CommState.READY, 0)] == _states(pair.decode)
    box = _send_layers(pair, "t2", layers[:1])  # a second transfer reuses the same communicator
    assert _receive(pair, "t2", [(3000,)]) == layers[:1]
    box["thread"].join(5.0)  # type: ignore[union-attr]
    assert _states(pair.prefill) == [(1, CommState.READY, 0)] == _states(pair.decode)


def test_a_size_mismatch_is_refused_on_both_sides_before_a_byte_moves(pair: Pair) -> None:
    box = _send_layers(pair, "t1", [_layer(0, 100)])
    pair.inc.expect(layer_key("t1", 0), [memoryview(bytearray(99))])
    with pytest.raises(SizeMismatch):
        pair.inc.wait(layer_key("t1", 0), 5.0)
    box["thread"].join(5.0)  # type: ignore[union-attr]
    error = box["error"]
    assert isinstance(error, SizeMismatch) and (error.sent, error.posted) == (100, 99)
    # Nothing went on the communicator: it stays usable for the next transfer.
    box = _send_layers(pair, "t2", [_layer(1, 64)])
    assert _receive(pair, "t2", [(64,)]) == [_layer(1, 64)]
    assert _states(pair.decode) == [(1, CommState.READY, 0)]


def test_a_send_from_another_sender_epoch_is_refused_and_the_receive_waits_on(pair: Pair) -> None:
    stale = TransferKey("t1", PREFILL.epoch - 1, 0)  # what an earlier incarnation of the prefill would send
    thread, box = _in_thread(lambda: pair.prefill.link.send(DECODE, stale, [memoryview(bytearray(8))], 5.0))
    pair.inc.expect(layer_key("t1", 0), [memoryview(bytearray(8))])
    start = time.monotonic()
    with pytest.raises(TransportTimeout):
        pair.inc.wait(layer_key("t1", 0), 0.5)
    assert time.monotonic() - start >= 0.5
    thread.join(5.0)
    assert isinstance(box["error"], PeerGone) and "epoch" in str(box["error"])


def test_a_peer_that_dies_mid_transfer_fails_the_receive_at_once_and_the_pair_is_rebuilt(pair: Pair) -> None:
    box = _send_layers(pair, "t1", [_layer(0, 256)])  # builds generation 1 on both sides
    assert _receive(pair, "t1", [(256,)]) == [_layer(0, 256)]
    # The prefill announces a layer, takes the go, and dies before sending it (its communicator aborted).
    key = TransferKey("t2", PREFILL.epoch, 0)
    offered, answer = _in_thread(lambda: pair.prefill.controls.offer(DECODE, Offer(key, (256,), 1), 5.0))
    pair.inc.expect(layer_key("t2", 0), [memoryview(bytearray(256))])
    waiting, outcome = _in_thread(lambda: pair.inc.wait(layer_key("t2", 0), 30.0))
    offered.join(5.0)
    assert isinstance(answer["result"], Go)
    start = time.monotonic()
    pair.prefill.link.reset(DECODE, "the prefill process died")
    waiting.join(10.0)
    assert isinstance(outcome["error"], PeerGone)
    assert time.monotonic() - start < 5.0  # failed when the peer went, not at its 30 s deadline
    assert _states(pair.decode) == [(1, CommState.BROKEN, 0)]
    # The next transfer builds generation 2 on both sides and lands intact.
    box = _send_layers(pair, "t3", [_layer(3, 512), _layer(4, 512)])
    assert _receive(pair, "t3", [(512,), (100, 412)]) == [_layer(3, 512), _layer(4, 512)]
    box["thread"].join(5.0)  # type: ignore[union-attr]
    assert [(g, s) for g, s, _ in _states(pair.decode)] == [(2, CommState.READY)]
    assert [(g, s) for g, s, _ in _states(pair.prefill)] == [(2, CommState.READY)]


def test_a_receive_past_its_deadline_aborts_both_sides_and_the_next_transfer_rebuilds(pair: Pair) -> None:
    assert _send_layers(pair, "t1", [_layer(0, 64)]) and _receive(pair, "t1", [(64,)]) == [_layer(0, 64)]
    # The prefill announces a layer and never sends it (a stalled peer): the decode gives up at its deadline.
    key = TransferKey("t2", PREFILL.epoch, 0)
    offered, _ = _in_thread(lambda: pair.prefill.controls.offer(DECODE, Offer(key, (64,), 1), 5.0))
    pair.inc.expect(layer_key("t2", 0), [memoryview(bytearray(64))])
    start = time.monotonic()
    with pytest.raises(TransportTimeout):
        pair.inc.wait(layer_key("t2", 0), 0.5)
    assert 0.5 <= time.monotonic() - start < 3.0
    offered.join(5.0)
    # The decode tells the prefill over the control link, which aborts its own communicator.
    assert pair.out.control.wait_resets(1, 5.0)
    assert [(g, s) for g, s, _ in _states(pair.prefill)] == [(1, CommState.BROKEN)]
    box = _send_layers(pair, "t3", [_layer(5, 64)])
    assert _receive(pair, "t3", [(64,)]) == [_layer(5, 64)]
    box["thread"].join(5.0)  # type: ignore[union-attr]
    assert "error" not in box
    assert [(g, s) for g, s, _ in _states(pair.prefill)] == [(2, CommState.READY)]


def test_a_closed_control_link_fails_its_transfers_with_peer_gone(pair: Pair) -> None:
    pair.out.close()
    with pytest.raises(PeerGone):
        pair.out.send(layer_key("t1", 0), [memoryview(bytearray(8))], 1.0)


def test_socket_communicators_move_bytes_at_buffer_addresses_in_order() -> None:
    a, b = SocketBackend(), SocketBackend()
    uid = a.new_id()
    _, joined = _in_thread(lambda: b.join(uid, 1, 5.0))
    ca = a.join(uid, 0, 5.0)
    while "result" not in joined and "error" not in joined:
        threading.Event().wait(0.001)  # joined within the rendezvous: the thread's box is set once it returns
    cb = joined["result"]
    src = [os.urandom(1000), os.urandom(24)]
    dst = bytearray(1024)
    sends = [ca.send(a.spans([memoryview(s)]), None) for s in src]
    recv = cb.recv(b.spans([memoryview(dst)[:1000], memoryview(dst)[1000:]]))  # type: ignore[attr-defined]
    assert all(s.wait(5.0) for s in sends) and recv.wait(5.0)
    assert bytes(dst) == b"".join(src)
    ca.abort()
    with pytest.raises(Exception, match="aborted|gone"):
        cb.recv(b.spans([memoryview(dst)])).wait(5.0)  # type: ignore[attr-defined]
