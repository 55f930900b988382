"""Mutual authentication of a new link with the cluster secret: HMAC-SHA256 challenge and response both ways.

    dialer   -> listener  HELLO(role=dialer, nonce_d, endpoint_d)
    listener -> dialer    HELLO(role=listener, nonce_l, endpoint_l)
    dialer   -> listener  HMAC(secret, "pdkv dialer"   | transcript)              transcript = HELLO_d | HELLO_l
    listener -> dialer    0x01 | HMAC(secret, "pdkv listener" | transcript)    or 0x00 and close (refused)

Contract:
- Nothing but these fixed-layout `struct` messages is read before both proofs check out, so a peer without the
  secret is refused before it can send a single frame (and the listener never proves itself to it).
- Fresh random nonces on both sides make every proof single-use; the role labels stop a proof from being
  reflected back; the transcript binds both endpoints (instance id and epoch) to the proofs.
- Digests are compared with `hmac.compare_digest`. The whole exchange must finish within the handshake timeout.
- What this does not do: encrypt or sign the data that follows. Against an attacker who can rewrite traffic on
  the cluster network, run the links over a private network or a VPN.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import socket
import struct
import time

from kv_transfer.endpoint import Endpoint
from kv_transfer.transport import (
    AuthFailed,
    FrameError,
    PeerGone,
    TransportConfig,
    TransportError,
    TransportTimeout,
)

HELLO = struct.Struct("!8sBB32sQH")  # magic, version, role, nonce, epoch, instance id length; then the id
MAGIC = b"PDKVAUTH"
VERSION = 1
DIALER, LISTENER = 1, 2
MAX_ID_BYTES = 256
PROOF_BYTES = 32
ACCEPTED, REFUSED = b"\x01", b"\x00"


def _hello(endpoint: Endpoint, role: int, nonce: bytes) -> bytes:
    ident = endpoint.instance_id.encode()
    if len(ident) > MAX_ID_BYTES:
        raise ValueError(f"instance id {endpoint.instance_id!r} is longer than {MAX_ID_BYTES} bytes")
    return HELLO.pack(MAGIC, VERSION, role, nonce, endpoint.epoch, len(ident)) + ident


def _proof(secret: bytes, role: int, transcript: bytes) -> bytes:
    label = b"pdkv dialer|" if role == DIALER else b"pdkv listener|"
    return hmac.new(secret, label + transcript, hashlib.sha256).digest()


def _read(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    off = 0
    while off < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransportTimeout("the peer did not finish the handshake in time")
        sock.settimeout(left)
        got = sock.recv_into(view[off:])
        if got == 0:
            raise PeerGone("the peer closed the connection during the handshake")
        off += got
    return bytes(buf)


def _send(sock: socket.socket, data: bytes, deadline: float) -> None:
    sock.settimeout(max(deadline - time.monotonic(), 1e-3))
    sock.sendall(data)


def decode_hello(raw: bytes, expect_role: int) -> tuple[bytes, int, int]:
    """(nonce, epoch, id length) from a fixed-size HELLO; `FrameError` for anything else."""
    magic, version, role, nonce, epoch, id_len = HELLO.unpack(raw)
    if magic != MAGIC:
        raise FrameError("the peer does not speak the pdserve KV transport protocol")
    if version != VERSION:
        raise FrameError(f"handshake version {version}, this side speaks {VERSION}")
    if role != expect_role:
        raise FrameError(f"the peer claims role {role}, expected {expect_role}")
    if not 0 < id_len <= MAX_ID_BYTES:
        raise FrameError(f"instance id of {id_len} bytes in the handshake")
    return nonce, epoch, id_len


def _read_hello(sock: socket.socket, role: int, deadline: float) -> tuple[bytes, Endpoint]:
    head = _read(sock, HELLO.size, deadline)
    _, epoch, id_len = decode_hello(head, role)
    ident = _read(sock, id_len, deadline)
    try:
        endpoint = Endpoint(ident.decode(), epoch)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FrameError(f"bad endpoint in the handshake: {exc}") from exc
    return head + ident, endpoint


def authenticate(sock: socket.socket, config: TransportConfig, dialer: bool) -> Endpoint:
    """Run the handshake on a fresh connection; the peer's endpoint, or `AuthFailed`/`TransportTimeout`/..."""
    deadline = time.monotonic() + config.handshake_timeout_s
    try:
        if dialer:
            return _as_dialer(sock, config, deadline)
        return _as_listener(sock, config, deadline)
    except TransportError:
        raise
    except TimeoutError as exc:
        raise TransportTimeout("the peer did not finish the handshake in time") from exc
    except OSError as exc:
        raise PeerGone(f"connection lost during the handshake: {exc}") from exc


def _as_dialer(sock: socket.socket, config: TransportConfig, deadline: float) -> Endpoint:
    mine = _hello(config.endpoint, DIALER, os.urandom(32))
    _send(sock, mine, deadline)
    theirs, peer = _read_hello(sock, LISTENER, deadline)
    transcript = mine + theirs
    _send(sock, _proof(config.secret, DIALER, transcript), deadline)
    if _read(sock, 1, deadline) != ACCEPTED:
        raise AuthFailed(f"{peer} refused our proof: the two sides hold different cluster secrets")
    if not hmac.compare_digest(_read(sock, PROOF_BYTES, deadline), _proof(config.secret, LISTENER, transcript)):
        raise AuthFailed(f"{peer} could not prove it holds the cluster secret")
    return peer


def _as_listener(sock: socket.socket, config: TransportConfig, deadline: float) -> Endpoint:
    theirs, peer = _read_hello(sock, DIALER, deadline)
    mine = _hello(config.endpoint, LISTENER, os.urandom(32))
    _send(sock, mine, deadline)
    transcript = theirs + mine
    if not hmac.compare_digest(_read(sock, PROOF_BYTES, deadline), _proof(config.secret, DIALER, transcript)):
        with contextlib.suppress(OSError):  # it may already be gone; it is refused either way
            _send(sock, REFUSED, deadline)
        raise AuthFailed(f"{peer} could not prove it holds the cluster secret")
    _send(sock, ACCEPTED + _proof(config.secret, LISTENER, transcript), deadline)
    return peer
