"""The decode side's receive path over real shm links: loads, faults, fencing, leases, releases.

Every test ends with nothing posted and nothing stashed: a failed transfer leaves no byte behind and no late
byte lands in memory the engine may have reused.
"""

from __future__ import annotations

import time

import pytest

from kv_transfer import shm
from kv_transfer.endpoint import Endpoint
from kv_transfer.params import RecvSpec, layer_key
from kv_transfer.receiver import Landed, Receiver
from kv_transfer.transport import TransportConfig

SECRET = b"s" * 32
LAYERS = 3
SIZE = 4096


def config(instance: str, epoch: int = 1) -> TransportConfig:
    return TransportConfig(Endpoint(instance, epoch), SECRET, stall_timeout_s=2.0)


@pytest.fixture
def receiver():
    listener = shm.listen(config("decode-0"))
    r = Receiver([listener], listener.address, lease_s=3600.0)
    yield r
    r.close()


def dial(receiver: Receiver, instance: str = "prefill-0", epoch: int = 1):
    return shm.connect(receiver.address, config(instance, epoch), timeout=5.0)


def destination() -> tuple[list[bytearray], list[list[memoryview]]]:
    buffers = [bytearray(SIZE) for _ in range(LAYERS)]
    return buffers, [[memoryview(b)] for b in buffers]


def wait_done(receiver: Receiver) -> Landed:
    (landed,) = receiver.completed(timeout=30.0)
    return landed


def sync(receiver: Receiver, link) -> None:
    """Returns once the receiver has read everything sent on `link` so far (a link delivers in order)."""
    _, views = destination()
    receiver.load("sync", RecvSpec("sync", "prefill-0", 10, time.time() + 10), views)
    for i in range(LAYERS):
        link.send(layer_key("sync", i), [memoryview(b"\0" * SIZE)], 5.0)
    assert wait_done(receiver).ok


def assert_clean(receiver: Receiver) -> None:
    state = receiver.state()
    assert state["stashed_bytes"] == 0 and state["pending_loads"] == 0, state


def test_layers_land_in_the_posted_blocks_whether_they_come_before_or_after_the_post(receiver):
    link = dial(receiver)
    payloads = [bytes([i + 1]) * SIZE for i in range(LAYERS)]
    link.send(layer_key("t", 0), [memoryview(payloads[0])], 5.0)  # before the post: stashed
    buffers, views = destination()
    receiver.load("r", RecvSpec("t", "prefill-0", 10, time.time() + 10), views)
    for i in range(1, LAYERS):
        link.send(layer_key("t", i), [memoryview(payloads[i])], 5.0)
    landed = wait_done(receiver)
    assert landed.ok and landed.bytes == LAYERS * SIZE
    assert [bytes(b) for b in buffers] == payloads
    assert_clean(receiver)
    link.close()


def test_a_load_says_how_many_layers_had_landed_before_its_post(receiver):
    link = dial(receiver)
    for i in range(LAYERS - 1):
        link.send(layer_key("t", i), [memoryview(b"\1" * SIZE)], 5.0)
    sync(receiver, link)  # the first layers wait whole in the stash
    _, views = destination()
    receiver.load("r", RecvSpec("t", "prefill-0", 10, time.time() + 10), views)
    last_sent = time.time()
    link.send(layer_key("t", LAYERS - 1), [memoryview(b"\1" * SIZE)], 5.0)
    landed = wait_done(receiver)
    # the last layer may still beat the pool thread's post; the first ones certainly did
    assert landed.ok and landed.layers == LAYERS and landed.early_layers in (LAYERS - 1, LAYERS)
    assert landed.posted <= landed.landed and last_sent <= landed.landed
    assert {k: landed.record()[k] for k in ("layers", "early_layers")} == {"layers": LAYERS,
                                                                          "early_layers": landed.early_layers}
    assert_clean(receiver)
    link.close()


def test_a_load_whose_every_layer_waited_in_the_stash_is_marked_early(receiver):
    link = dial(receiver)
    for i in range(LAYERS):
        link.send(layer_key("t", i), [memoryview(b"\1" * SIZE)], 5.0)
    sync(receiver, link)
    synced = time.time()  # every layer of "t" arrived before this (the link delivers in order)
    _, views = destination()
    receiver.load("r", RecvSpec("t", "prefill-0", 10, time.time() + 10), views)
    landed = wait_done(receiver)
    assert landed.ok and landed.early_layers == landed.layers == LAYERS  # landed: the copy, not the arrival
    assert 0 < landed.arrived < synced <= landed.posted <= landed.landed  # arrived: the last layer's arrival
    assert_clean(receiver)
    link.close()


def test_a_dropped_connection_fails_the_load_and_frees_everything(receiver):
    link = dial(receiver)
    _buffers, views = destination()
    receiver.load("r", RecvSpec("t", "prefill-0", 10, time.time() + 10), views)
    link.send(layer_key("t", 0), [memoryview(b"\1" * SIZE)], 5.0)
    link.close()
    landed = wait_done(receiver)
    assert not landed.ok and "PeerGone" in landed.error
    assert_clean(receiver)


def test_a_stalled_peer_fails_at_the_deadline_and_its_late_bytes_land_nowhere(receiver):
    link = dial(receiver)
    buffers, views = destination()
    receiver.load("r", RecvSpec("t", "prefill-0", 10, time.time() + 0.5), views)
    link.send(layer_key("t", 0), [memoryview(b"\1" * SIZE)], 5.0)
    landed = wait_done(receiver)  # layers 1 and 2 never came
    assert not landed.ok and "TransportTimeout" in landed.error
    for i in (1, 2):  # the peer wakes up
        link.send(layer_key("t", i), [memoryview(b"\2" * SIZE)], 5.0)
    # A later transfer on the same link proves the late bytes were read (and dropped) before it.
    _, views2 = destination()
    receiver.load("r2", RecvSpec("u", "prefill-0", 10, time.time() + 10), views2)
    for i in range(LAYERS):
        link.send(layer_key("u", i), [memoryview(b"\3" * SIZE)], 5.0)
    assert wait_done(receiver).ok
    assert all(b"\2" not in bytes(b) for b in buffers)
    assert_clean(receiver)
    link.close()


def test_a_link_from_a_stale_epoch_is_turned_away(receiver):
    new = dial(receiver, epoch=5)
    sync(receiver, new)  # admitted (handshakes run on threads of their own: the stale one must come after it)
    _, views = destination()
    receiver.load("r", RecvSpec("t", "prefill-0", 10, time.time() + 10), views)
    stale = dial(receiver, epoch=4)
    for i in range(LAYERS):
        new.send(layer_key("t", i), [memoryview(b"\1" * SIZE)], 5.0)
    assert wait_done(receiver).ok
    with pytest.raises(Exception, match="closed|down|gone|Broken|reset"):
        for _ in range(50):  # the receiver closed it after the handshake; the next sends find out
            stale.send(b"x", [memoryview(b"\0" * SIZE)], 1.0)
    stale.close()
    new.close()
    assert_clean(receiver)


def test_a_release_frees_what_arrived_and_refuses_what_is_still_to_come(receiver):
    link = dial(receiver)
    for i in range(LAYERS):
        link.send(layer_key("t", i), [memoryview(b"\1" * SIZE)], 5.0)
        link.send(layer_key("u", i), [memoryview(b"\1" * SIZE)], 5.0)
    sync(receiver, link)
    assert receiver.state()["stashed_bytes"] == 2 * LAYERS * SIZE
    assert receiver.release(["t", "v"], LAYERS) == LAYERS * SIZE
    assert receiver.state()["stashed_bytes"] == LAYERS * SIZE
    assert receiver.release(["u"], LAYERS) == LAYERS * SIZE
    for i in range(LAYERS):  # a prefill that was still sending when the transfer was called off
        link.send(layer_key("v", i), [memoryview(b"\1" * SIZE)], 5.0)
    sync(receiver, link)
    assert_clean(receiver)
    link.close()


def test_a_release_fails_a_load_that_waits_for_the_called_off_transfer(receiver):
    link = dial(receiver)
    _buffers, views = destination()
    receiver.load("r", RecvSpec("t", "prefill-0", 10, time.time() + 600), views)
    link.send(layer_key("t", 0), [memoryview(b"\1" * SIZE)], 5.0)
    sync(receiver, link)  # layer 0 landed in the posted blocks; layers 1 and 2 will never come
    receiver.release(["t"], LAYERS)
    landed = wait_done(receiver)  # at once, not at the deadline ten minutes away
    assert not landed.ok and "called off" in landed.error
    assert_clean(receiver)
    link.close()


def test_unclaimed_kv_is_freed_when_its_lease_runs_out():
    listener = shm.listen(config("decode-0"))
    lease_s = 60.0
    receiver = Receiver([listener], listener.address, lease_s=lease_s)
    try:
        link = dial(receiver)
        link.send(layer_key("t", 0), [memoryview(b"\1" * SIZE)], 5.0)
        sync(receiver, link)
        assert receiver.state()["stashed_bytes"] == SIZE  # nobody claimed it
        assert receiver.expire() == 0  # within its lease
        assert receiver.expire(now=time.monotonic() + lease_s + 1) == SIZE
        assert_clean(receiver)
        link.close()
    finally:
        receiver.close()
