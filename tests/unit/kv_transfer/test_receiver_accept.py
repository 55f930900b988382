"""The receiver's accept path over real tcp sockets: peers that connect and say nothing hold up nobody, and too
many of them at once are turned away on arrival."""

from __future__ import annotations

import socket

import pytest

from kv_transfer import receiver as receiver_module
from kv_transfer import tcp
from kv_transfer.endpoint import Endpoint
from kv_transfer.receiver import Receiver
from kv_transfer.transport import TransportConfig

SECRET = b"s" * 32
LISTENER_HANDSHAKE_S = 30.0  # a silent peer holds its handshake this long
DIALER_HANDSHAKE_S = 3.0  # the real dialer gives up well before that


def test_silent_connections_do_not_block_a_real_link():
    listener = tcp.listen(TransportConfig(Endpoint("decode-0", 1), SECRET, handshake_timeout_s=LISTENER_HANDSHAKE_S))
    receiver = Receiver([listener], "unused", lease_s=3600.0)
    silent = [socket.create_connection(listener.address, timeout=5.0) for _ in range(3)]
    try:
        dialer = TransportConfig(Endpoint("prefill-0", 1), SECRET, handshake_timeout_s=DIALER_HANDSHAKE_S)
        link = tcp.connect(listener.address, dialer, timeout=DIALER_HANDSHAKE_S)  # raised TransportTimeout before
        assert link.is_up
        for sock in silent:  # still open and unanswered: the real link did not wait for them to time out
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
        link.close()
    finally:
        for sock in silent:
            sock.close()
        receiver.close()


def test_connections_beyond_the_handshake_cap_are_closed_on_arrival(monkeypatch):
    monkeypatch.setattr(receiver_module, "MAX_HANDSHAKES", 2)
    listener = tcp.listen(TransportConfig(Endpoint("decode-0", 1), SECRET, handshake_timeout_s=LISTENER_HANDSHAKE_S))
    receiver = Receiver([listener], "unused", lease_s=3600.0)
    silent = [socket.create_connection(listener.address, timeout=5.0) for _ in range(3)]
    try:
        silent[2].settimeout(10.0)
        assert silent[2].recv(1) == b""  # the third is closed at once, long before the handshake timeout
    finally:
        for sock in silent:
            sock.close()
        receiver.close()
