"""Dialing decode workers from a prefill worker over real sockets: the route per pair, why a link could not be made,
the start-up probe, and the sender's report of each transfer's link, which lets the router fall back at once."""

from __future__ import annotations

import errno
import socket
import threading
import time

import pytest

from kv_transfer import shm, tcp
from kv_transfer.address import KVAddress, NoRoute
from kv_transfer.dial import Dialer, reason
from kv_transfer.endpoint import Endpoint
from kv_transfer.params import RecvSpec, SendSpec, layer_key
from kv_transfer.receiver import Receiver
from kv_transfer.sender import Outgoing, Sender
from kv_transfer.transport import AuthFailed, PeerGone, TransportConfig, TransportTimeout
from tests.conftest import poll

SECRET = b"cluster-secret-0123456789abcdef"
PREFILL = TransportConfig(Endpoint("prefill-0", 5), SECRET, handshake_timeout_s=1.0, stall_timeout_s=2.0)
DECODE = TransportConfig(Endpoint("decode-0", 2), SECRET, handshake_timeout_s=1.0, stall_timeout_s=2.0)


@pytest.fixture
def decode():
    """A decode worker's receiver on node "node-b", listening on shared memory and tcp (transport auto)."""
    listeners = [shm.listen(DECODE), tcp.listen(DECODE)]
    address = KVAddress("node-b", listeners[0].address, ("127.0.0.1", listeners[1].address[1]))
    receiver = Receiver(listeners, str(address), lease_s=60.0)
    yield receiver
    receiver.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tcp_address(port: int) -> str:
    return str(KVAddress("node-b", None, ("127.0.0.1", port)))


def links_of(receiver: Receiver) -> int:
    return receiver.state()["links"]


@pytest.mark.parametrize("node", ["node-b", "node-a"])
def test_a_prefill_on_either_node_reaches_a_decode_that_offers_both_routes(decode, node):
    link = Dialer(PREFILL, node)(decode.address, 2.0)
    assert link.peer == DECODE.endpoint
    poll(lambda: links_of(decode) == 1, "the decode side to admit the link", timeout=10)
    link.close()


def test_the_route_is_picked_per_pair():
    # Shared memory that nobody listens on beside a working tcp route: only a prefill on the same node tries it.
    listener = tcp.listen(DECODE)
    address = str(KVAddress("node-b", "pdkv-nobody-listens", ("127.0.0.1", listener.address[1])))
    receiver = Receiver([listener], address, lease_s=60.0)
    try:
        with pytest.raises(PeerGone) as failed:
            Dialer(PREFILL, "node-b")(address, 2.0)
        assert reason(failed.value) == "refused"
        link = Dialer(PREFILL, "node-a")(address, 2.0)
        assert link.peer == DECODE.endpoint
        link.close()
    finally:
        receiver.close()


def test_a_refused_connection_fails_at_once_and_says_refused():
    start = time.monotonic()
    with pytest.raises(PeerGone) as failed:
        Dialer(PREFILL, "node-a")(tcp_address(closed_port()), 5.0)
    assert reason(failed.value) == "refused"
    assert time.monotonic() - start < 2.0


def test_a_peer_without_the_secret_is_auth_and_one_that_never_answers_is_timeout():
    stranger = TransportConfig(Endpoint("decode-0", 2), b"another-secret-0123456789abcdef", handshake_timeout_s=1.0)
    with tcp.listen(stranger) as listener:
        address = tcp_address(listener.address[1])

        def serve() -> None:
            with pytest.raises(AuthFailed):
                listener.accept(timeout=5.0)

        server = threading.Thread(target=serve)
        server.start()
        with pytest.raises(AuthFailed) as failed:
            Dialer(PREFILL, "node-a")(address, 2.0)
        server.join()
        assert reason(failed.value) == "auth"
    mute = socket.create_server(("127.0.0.1", 0))  # accepts connections (its backlog) and never answers
    with mute, pytest.raises(TransportTimeout) as stalled:
        Dialer(PREFILL, "node-a")(tcp_address(mute.getsockname()[1]), 2.0)
    assert reason(stalled.value) == "timeout"


def test_unreachable_and_malformed_addresses_have_their_own_reasons():
    unreachable = PeerGone("could not connect")
    unreachable.__cause__ = OSError(errno.EHOSTUNREACH, "No route to host")
    assert reason(unreachable) == "unreachable"
    with pytest.raises(NoRoute) as malformed:
        Dialer(PREFILL, "node-a")("node:n,rdma:10.0.0.2:41234", 1.0)
    assert reason(malformed.value) == "no_route"


def test_the_probe_names_each_peer_it_cannot_reach_and_leaves_the_real_link_alone(decode):
    dialer = Dialer(PREFILL, "node-a")
    real = dialer(decode.address, 2.0)
    poll(lambda: links_of(decode) == 1, "the decode side to admit the link", timeout=10)
    dead = tcp_address(closed_port())
    failures = dialer.probe([("decode-0", decode.address), ("decode-1", dead)], timeout=2.0)
    assert failures == [{"instance_id": "decode-1", "address": dead, "reason": "refused",
                         "error": failures[0]["error"]}]
    assert "Connection refused" in failures[0]["error"]
    assert real.is_up  # the probe dialed as "prefill-0.probe": the link of "prefill-0" was not replaced
    poll(lambda: links_of(decode) == 1, "the probe's closed link to be forgotten", timeout=10)
    into = bytearray(2)
    decode.load("r", RecvSpec("t", "prefill-0", 1, time.time() + 10), [[memoryview(into)]])
    real.send(layer_key("t", 0), [memoryview(b"kv")], 2.0)
    (landed,) = decode.completed(timeout=10.0)
    assert landed.ok and into == b"kv"  # the real link carries KV still: the probe left it alone
    real.close()
    poll(lambda: links_of(decode) == 0, "the closed link to be forgotten", timeout=10)


def outgoing(transfer_id: str, peer: str) -> Outgoing:
    spec = SendSpec(transfer_id, peer, "decode-0", num_tokens=16, deadline=time.time() + 60)
    return Outgoing(transfer_id, spec, layers=2)


def test_the_sender_reports_each_transfers_link_at_its_first_layer(decode):
    sender = Sender(Dialer(PREFILL, "node-a"), connect_timeout_s=2.0)
    try:
        out = outgoing("t1", decode.address)
        for layer in range(2):
            sender.submit(out, layer, [memoryview(b"kv")])
        (dial,) = sender.dialed(timeout=10.0)
        assert dial == {"transfer_id": "t1", "ok": True, "peer": decode.address, "peer_instance": "decode-0",
                        "reason": "", "error": ""}
    finally:
        sender.close()


def test_transfers_queued_behind_a_failed_dial_fail_with_it_and_later_ones_dial_again():
    calls: list[str] = []
    dead = tcp_address(closed_port())
    queued = threading.Event()

    def dial(address: str, timeout: float):
        calls.append(address)
        queued.wait(10.0)  # the first dial fails only once the second transfer waits behind it
        return Dialer(PREFILL, "node-a")(address, timeout)

    def transfer(sender: Sender, transfer_id: str) -> None:
        out = outgoing(transfer_id, dead)
        for layer in range(2):
            sender.submit(out, layer, [memoryview(b"kv")])

    def reports(sender: Sender, n: int) -> list[tuple[object, object, object]]:
        got = sender.dialed(timeout=10.0)
        while len(got) < n:
            got += sender.dialed(timeout=10.0)
        assert all("Connection refused" in str(r["error"]) for r in got)
        return [(r["transfer_id"], r["ok"], r["reason"]) for r in got]

    sender = Sender(dial, connect_timeout_s=60.0)
    try:
        transfer(sender, "t1")
        transfer(sender, "t2")
        queued.set()
        assert reports(sender, 2) == [("t1", False, "refused"), ("t2", False, "refused")]
        assert calls == [dead]  # the second transfer failed with the first dial, without one of its own
        transfer(sender, "t3")
        assert reports(sender, 1) == [("t3", False, "refused")]
        assert calls == [dead, dead]  # a transfer queued after the failure dials again: the peer may be back
        done = sender.completed(timeout=10.0)
        while len(done) < 3:
            done += sender.completed(timeout=10.0)  # every layer of each was handled: their blocks can go back
        assert all(o.error for o in done)
    finally:
        sender.close()
