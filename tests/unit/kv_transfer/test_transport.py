"""The CPU transports (`tcp`, `shm`): bytes intact, authentication, timeouts, peer death, cleanup, frame checks.

Most tests link two endpoints inside this process; the stalled and dead peer tests use a spawned child process,
stopped with SIGSTOP or killed with SIGKILL, as a real peer would stall or crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import multiprocessing as mp
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import pytest

from kv_transfer import shm, tcp
from kv_transfer.auth import authenticate
from kv_transfer.endpoint import Endpoint
from kv_transfer.link import Link, Listener
from kv_transfer.transport import (
    MAX_KEY_BYTES,
    AuthFailed,
    FrameError,
    PeerGone,
    SizeMismatch,
    Transport,
    TransportConfig,
    TransportTimeout,
    recv,
)
from kv_transfer.wire import HEADER, Header, Kind, decode_header, encode_header
from tests.conftest import poll

SECRET = b"cluster-secret-0123456789abcdef"
DECODE = TransportConfig(Endpoint("decode-0", 2), SECRET, handshake_timeout_s=2.0, stall_timeout_s=2.0)
PREFILL = TransportConfig(Endpoint("prefill-0", 5), SECRET, handshake_timeout_s=2.0, stall_timeout_s=2.0)
SMALL_RING = shm.RingConfig(slot_bytes=64 << 10, slots=4)  # many laps of the ring per message
KINDS = ["tcp", "shm"]


def _listen(kind: str, config: TransportConfig) -> Listener[Any]:
    return tcp.listen(config) if kind == "tcp" else shm.listen(config, SMALL_RING)


def _connect(kind: str, address: object, config: TransportConfig) -> Link:
    if kind == "tcp":
        return tcp.connect(address, config, 5.0)  # type: ignore[arg-type]
    return shm.connect(address, config, 5.0, SMALL_RING)  # type: ignore[arg-type]


@contextlib.contextmanager
def linked(kind: str, listener_config: TransportConfig = DECODE) -> Iterator[tuple[Link, Link]]:
    """(decode side, prefill side) of one link."""
    with _listen(kind, listener_config) as listener, ThreadPoolExecutor(1) as pool:
        accepted = pool.submit(listener.accept, 5.0)
        dialer = _connect(kind, listener.address, PREFILL)
        with accepted.result(5.0) as receiver, dialer:
            yield receiver, dialer


def _pattern(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _split(data: bytes | bytearray, cuts: list[int]) -> list[memoryview]:
    view = memoryview(data)
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    return [view[a:b] for a, b in itertools.pairwise(bounds)]


def _ring_mappings() -> list[str]:
    with open("/proc/self/maps") as maps:
        return [line for line in maps if "pdkv-ring" in line]


@pytest.mark.parametrize("kind", KINDS)
def test_bytes_arrive_intact_in_scattered_buffers(kind: str) -> None:
    sizes = [0, 1, 4095, (64 << 10) + 1, 3 * (64 << 10) - 1, (5 << 20) + 7]
    with linked(kind) as (receiver, sender):
        assert isinstance(receiver, Transport) and receiver.peer == PREFILL.endpoint
        assert sender.peer == DECODE.endpoint
        for i, n in enumerate(sizes):
            data = _pattern(n, seed=i)
            dst = bytearray(n)
            key = f"req-1/epoch-5/layer-{i}".encode()
            receiver.expect(key, _split(dst, [n // 3, n // 3 + 7]))
            sender.send(key, _split(data, [n // 2, n - 3]), timeout=5.0)
            assert receiver.wait(key, timeout=5.0) == n
            assert hashlib.sha256(dst).digest() == hashlib.sha256(data).digest()


@pytest.mark.parametrize("kind", KINDS)
def test_both_directions_at_once(kind: str) -> None:
    n = 1 << 20
    with linked(kind) as (a, b):
        results: dict[str, bytearray] = {"a": bytearray(n), "b": bytearray(n)}
        a.expect(b"to-a", [memoryview(results["a"])])
        b.expect(b"to-b", [memoryview(results["b"])])
        senders = [
            threading.Thread(target=a.send, args=(b"to-b", [memoryview(_pattern(n, 1))], 5.0)),
            threading.Thread(target=b.send, args=(b"to-a", [memoryview(_pattern(n, 2))], 5.0)),
        ]
        for thread in senders:
            thread.start()
        assert a.wait(b"to-a", 5.0) == n and b.wait(b"to-b", 5.0) == n
        for thread in senders:
            thread.join(5.0)
        assert results["a"] == _pattern(n, 2) and results["b"] == _pattern(n, 1)


@pytest.mark.parametrize("kind", KINDS)
def test_message_sent_before_expect_is_delivered(kind: str) -> None:
    with linked(kind) as (receiver, sender):
        sender.send(b"early", [memoryview(b"hello "), memoryview(b"world")], 5.0)
        poll(lambda: receiver.holds(b"early"), "the early message to land in the stash", 5.0, 0.01)
        dst = bytearray(11)
        assert recv(receiver, b"early", [memoryview(dst)], 5.0) == 11
        assert dst == b"hello world"


@pytest.mark.parametrize("kind", KINDS)
def test_recycled_stash_buffers_never_mix_messages(kind: str) -> None:
    """Stashes are reused once claimed; each claim must still give exactly its own bytes, whatever the sizes."""
    n = 300_000
    sizes = [n, n, n - 100, 2 * n + 1, n // 2 + 1, n]
    with linked(kind) as (receiver, sender):
        for rnd in range(3):
            keys = [f"r{rnd}/layer-{i}".encode() for i in range(len(sizes))]
            for i, (key, size) in enumerate(zip(keys, sizes, strict=True)):
                sender.send(key, [memoryview(_pattern(size, seed=rnd * 100 + i))], 5.0)
            poll(lambda keys=keys: all(receiver.holds(k) for k in keys), "every message to land in the stash", 5.0,
                 0.01)
            for i, (key, size) in enumerate(zip(keys, sizes, strict=True)):
                dst = bytearray(size)
                assert recv(receiver, key, [memoryview(dst)], 5.0) == size
                assert dst == _pattern(size, seed=rnd * 100 + i), f"round {rnd}, message {i}"
        assert receiver.stashed_bytes == 0


@pytest.mark.parametrize("kind", KINDS)
def test_size_mismatch_fails_that_key_only(kind: str) -> None:
    with linked(kind) as (receiver, sender):
        receiver.expect(b"k", [memoryview(bytearray(10))])
        sender.send(b"k", [memoryview(bytes(200_000))], 5.0)
        with pytest.raises(SizeMismatch, match="sent 200000 bytes"):
            receiver.wait(b"k", 5.0)
        assert recv_after_send(receiver, sender, b"next", b"still fine") == b"still fine"


def recv_after_send(receiver: Link, sender: Link, key: bytes, data: bytes) -> bytes:
    dst = bytearray(len(data))
    receiver.expect(key, [memoryview(dst)])
    sender.send(key, [memoryview(data)], 5.0)
    receiver.wait(key, 5.0)
    return bytes(dst)


@pytest.mark.parametrize("kind", KINDS)
def test_wait_times_out_and_gives_the_buffer_back(kind: str) -> None:
    with linked(kind) as (receiver, sender):
        dst = bytearray(1000)
        receiver.expect(b"late", [memoryview(dst)])
        start = time.monotonic()
        with pytest.raises(TransportTimeout):
            receiver.wait(b"late", timeout=0.2)
        assert time.monotonic() - start < 5.0  # it gave up: a wait that ignored its timeout would block for good
        sender.send(b"late", [memoryview(b"x" * 1000)], 5.0)  # arrives after the timeout: discarded
        assert recv_after_send(receiver, sender, b"after", b"ok") == b"ok"
        assert dst == bytes(1000)


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_secret_is_refused_before_any_data(kind: str) -> None:
    intruder = TransportConfig(Endpoint("intruder", 0), b"not-the-cluster-secret-at-all!!")
    with _listen(kind, DECODE) as listener, ThreadPoolExecutor(1) as pool:
        accepted = pool.submit(listener.accept, 5.0)
        with pytest.raises(AuthFailed, match="refused our proof"):
            _connect(kind, listener.address, intruder)
        with pytest.raises(AuthFailed, match="intruder@0 could not prove"):
            accepted.result(5.0)
    with _listen(kind, intruder) as listener, ThreadPoolExecutor(1) as pool:
        accepted = pool.submit(listener.accept, 5.0)
        with pytest.raises(AuthFailed):
            _connect(kind, listener.address, PREFILL)  # an impostor listener is refused too
        with pytest.raises(AuthFailed):
            accepted.result(5.0)
    assert _ring_mappings() == []


def test_a_peer_speaking_garbage_is_refused_at_the_handshake() -> None:
    with tcp.listen(DECODE) as listener, ThreadPoolExecutor(1) as pool:
        accepted = pool.submit(listener.accept, 5.0)
        with socket.create_connection(listener.address) as sock:
            sock.sendall(os.urandom(4096))
            with pytest.raises(FrameError):
                accepted.result(5.0)


def test_a_silent_peer_times_out_the_handshake() -> None:
    config = TransportConfig(Endpoint("decode-0", 2), SECRET, handshake_timeout_s=0.3)
    with tcp.listen(config) as listener, socket.create_connection(listener.address), pytest.raises(TransportTimeout):
        listener.accept(5.0)


@contextlib.contextmanager
def raw_peer(config: TransportConfig = DECODE) -> Iterator[tuple[Link, socket.socket]]:
    """A real `tcp` link on one side, an authenticated bare socket on the other, to misbehave with."""
    with tcp.listen(config) as listener, ThreadPoolExecutor(1) as pool:
        accepted = pool.submit(listener.accept, 5.0)
        sock = socket.create_connection(listener.address)
        authenticate(sock, PREFILL, dialer=True)
        sock.settimeout(5.0)
        with accepted.result(5.0) as link, sock:
            yield link, sock


def _data_header(key: bytes, length: int) -> bytes:
    return encode_header(Header(Kind.DATA, len(key), 0, length)) + key


def test_garbage_frame_after_handshake_takes_the_link_down() -> None:
    with raw_peer() as (link, sock):
        link.expect(b"k", [memoryview(bytearray(8))])
        sock.sendall(b"\xff" * HEADER.size)
        with pytest.raises(FrameError, match="bad frame magic"):
            link.wait(b"k", 5.0)
        with pytest.raises(PeerGone, match="bad frame magic"):
            link.send(b"k", [memoryview(b"x")], 1.0)


def test_oversized_message_is_refused_without_allocating() -> None:
    config = TransportConfig(Endpoint("decode-0", 2), SECRET, max_message_bytes=1 << 20)
    with raw_peer(config) as (link, sock):
        link.expect(b"k", [memoryview(bytearray(8))])
        sock.sendall(_data_header(b"big", 1 << 40))
        with pytest.raises(FrameError, match="limit is 1048576"):
            link.wait(b"k", 5.0)


def test_unclaimed_messages_beyond_the_stash_cut_the_peer_off() -> None:
    config = TransportConfig(Endpoint("decode-0", 2), SECRET, max_stash_bytes=1000)
    with raw_peer(config) as (link, sock):
        link.expect(b"k", [memoryview(bytearray(8))])
        sock.sendall(_data_header(b"a", 600) + bytes(600) + _data_header(b"b", 600))
        with pytest.raises(FrameError, match="stash is full"):
            link.wait(b"k", 5.0)


def test_peer_stalling_mid_message_is_detected() -> None:
    config = TransportConfig(Endpoint("decode-0", 2), SECRET, stall_timeout_s=0.3)
    with raw_peer(config) as (link, sock):
        link.expect(b"k", [memoryview(bytearray(1000))])
        sock.sendall(_data_header(b"k", 1000) + bytes(10))
        start = time.monotonic()
        with pytest.raises(TransportTimeout, match="stalled"):
            link.wait(b"k", 30.0)
        assert time.monotonic() - start < 2.0


def test_connection_dropped_mid_message_is_peer_gone() -> None:
    with raw_peer() as (link, sock):
        link.expect(b"k", [memoryview(bytearray(1000))])
        sock.sendall(_data_header(b"k", 1000) + bytes(10))
        sock.close()
        with pytest.raises(PeerGone):
            link.wait(b"k", 5.0)


@pytest.mark.parametrize("kind", KINDS)
def test_close_tells_the_peer_and_frees_everything(kind: str) -> None:
    with linked(kind) as (receiver, sender):
        receiver.expect(b"never", [memoryview(bytearray(4))])
        if kind == "shm":
            assert _ring_mappings()  # mapped while the link is up
        sender.close()
        with pytest.raises(PeerGone, match="closed the link"):
            receiver.wait(b"never", 5.0)
        with pytest.raises(PeerGone):
            receiver.send(b"x", [memoryview(b"x")], 1.0)
        sender.close()  # idempotent
    assert _ring_mappings() == []
    assert not [t for t in threading.enumerate() if t.name.startswith("pdkv-reader")]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"KV",
        b"XX" + bytes(16),
        HEADER.pack(b"KV", 9, 1, 0, 0, 0),
        HEADER.pack(b"KV", 1, 99, 0, 0, 0),
        HEADER.pack(b"KV", 1, 1, MAX_KEY_BYTES + 1, 0, 0),
        HEADER.pack(b"KV", 1, 1, 4, 0, 1 << 41),
        HEADER.pack(b"KV", 1, Kind.FREE, 0, 0, 5),
        HEADER.pack(b"KV", 1, Kind.CHUNK, 3, 0, 5),
    ],
)
def test_header_decoding_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(FrameError):
        decode_header(raw, max_length=1 << 40)


def test_header_decoding_never_crashes_on_random_bytes() -> None:
    rng = random.Random(7)
    for _ in range(5000):
        raw = b"KV\x01" + rng.randbytes(HEADER.size - 3) if rng.random() < 0.5 else rng.randbytes(HEADER.size)
        try:
            header = decode_header(raw, max_length=1 << 30)
        except FrameError:
            continue
        assert header.length <= 1 << 30 and header.key_len <= MAX_KEY_BYTES
    header = Header(Kind.DATA, 3, 0, 12345)
    assert decode_header(encode_header(header), max_length=1 << 20) == header


def test_config_checks_and_never_shows_the_secret() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        TransportConfig(Endpoint("d", 0), b"short")
    with pytest.raises(ValueError, match="stall_timeout_s"):
        TransportConfig(Endpoint("d", 0), SECRET, stall_timeout_s=0)
    assert SECRET.decode() not in repr(DECODE)
    with pytest.raises(ValueError, match="multiple of 4096"):
        shm.RingConfig(slot_bytes=1000)


def test_keys_and_buffers_are_checked() -> None:
    with linked("tcp") as (receiver, sender):
        with pytest.raises(ValueError, match="at most"):
            sender.send(b"k" * (MAX_KEY_BYTES + 1), [memoryview(b"")], 1.0)
        with pytest.raises(ValueError, match="read-only"):
            receiver.expect(b"k", [memoryview(b"immutable")])
        receiver.expect(b"k", [memoryview(bytearray(1))])
        with pytest.raises(ValueError, match="already expected"):
            receiver.expect(b"k", [memoryview(bytearray(1))])


# Stalled and dead peers: a child process holds the other end.


def _peer_main(kind: str, address: object, ctl: Connection) -> None:
    link = _connect(kind, address, PREFILL)
    ctl.send_bytes(b"up")
    while True:
        cmd = ctl.recv_bytes()
        if cmd == b"die":
            os._exit(3)  # no close, no BYE: as a crash would
        link.send(cmd, [memoryview(_pattern(1 << 20))], 5.0)


@contextlib.contextmanager
def child_peer(kind: str) -> Iterator[tuple[Link, mp.process.BaseProcess, Connection]]:
    ctx = mp.get_context("spawn")
    ctl, child_ctl = ctx.Pipe()
    with _listen(kind, DECODE) as listener:
        child = ctx.Process(target=_peer_main, args=(kind, listener.address, child_ctl), daemon=True)
        child.start()
        try:
            with listener.accept(20.0) as link:
                assert ctl.poll(20.0) and ctl.recv_bytes() == b"up"
                yield link, child, ctl
        finally:
            if child.is_alive() and child.pid is not None:
                os.kill(child.pid, signal.SIGKILL)  # also ends a SIGSTOPped child
            child.join(10.0)


@pytest.mark.parametrize("kind", KINDS)
def test_stalled_peer_process_times_out_both_ways(kind: str) -> None:
    with child_peer(kind) as (link, child, _):
        assert child.pid is not None
        os.kill(child.pid, signal.SIGSTOP)
        link.expect(b"k", [memoryview(bytearray(8))])
        with pytest.raises(TransportTimeout):
            link.wait(b"k", 0.3)
        start = time.monotonic()
        with pytest.raises(TransportTimeout, match="deadline"):
            link.send(b"big", [memoryview(bytes(64 << 20))], timeout=0.5)
        assert time.monotonic() - start < 2.0
        with pytest.raises(PeerGone):  # a message broke off midway: the link is done for
            link.send(b"more", [memoryview(b"x")], 1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_dead_peer_process_is_detected_and_leaves_nothing(kind: str) -> None:
    with child_peer(kind) as (link, child, ctl):
        dst = bytearray(1 << 20)
        assert recv_from_child(link, ctl, b"first", dst) == 1 << 20 and dst == _pattern(1 << 20)
        link.expect(b"second", [memoryview(dst)])
        ctl.send_bytes(b"die")
        start = time.monotonic()
        with pytest.raises(PeerGone):
            link.wait(b"second", 10.0)
        assert time.monotonic() - start < 2.0
        child.join(5.0)
    assert _ring_mappings() == []
    assert not [f for f in os.listdir("/dev/shm") if "pdkv" in f]


def recv_from_child(link: Link, ctl: Connection, key: bytes, dst: bytearray) -> int:
    link.expect(key, [memoryview(dst)])
    ctl.send_bytes(key)
    return link.wait(key, 10.0)
