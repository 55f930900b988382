"""`LinkControl`: the NCCL transport's control plane (`nccl.Control`) over the pair's authenticated tcp link.

NCCL moves the bytes; everything the two sides must agree on first travels here as small JSON messages, in
order, each way: the device each side runs on (`hello`, sent once when the control starts), each communicator
generation's rendezvous id (`id`), the sender's announcement of a layer (`offer`) and the receiver's answer
(`go` or `reject`), and `reset`: the receiver gave up a transfer it had agreed to (its deadline passed, its
communicator failed) and aborted its communicator, so the sender aborts its own of that generation too (its
stream may hold a send nobody will match) and the next transfer builds a new generation.

Message n of one direction is two keyed messages on the link, `CONTROL_PREFIX + n` with the
body's length and then the body, so the link's own framing, authentication and failure handling apply; a reader
thread takes them in order and files them for whoever waits. When the link goes down every waiter fails with
`PeerGone`.

`Controls` routes the calls of a worker's one `NcclLink` to the `LinkControl` of the peer they name.
"""

from __future__ import annotations

import itertools
import json
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from kv_transfer.endpoint import Endpoint
from kv_transfer.nccl_keys import Go, Offer, Reject, RejectCode, TransferKey
from kv_transfer.transport import PeerGone, Transport, TransportError, TransportTimeout, recv

CONTROL_PREFIX = b"\x00nccl:"  # no layer key starts with a NUL byte
_LENGTH = struct.Struct("!I")
_IDLE_S = 1e9  # the reader waits for the next message until the link goes down


def is_control(key: bytes) -> bool:
    return key.startswith(CONTROL_PREFIX)


def _key(k: TransferKey) -> list[Any]:
    return [k.request_id, k.epoch, k.layer]


def _unkey(raw: list[Any]) -> TransferKey:
    return TransferKey(str(raw[0]), int(raw[1]), int(raw[2]))


def encode(message: Offer | Go | Reject) -> dict[str, Any]:
    if isinstance(message, Offer):
        return {"t": "offer", "key": _key(message.key), "sizes": list(message.sizes), "g": message.maker_generation}
    if isinstance(message, Go):
        return {"t": "go", "key": _key(message.key), "chunks": list(message.chunks), "seq": message.seq,
                "g": message.maker_generation}
    return {"t": "reject", "key": _key(message.key), "code": message.code.value, "reason": message.reason,
            "posted": message.posted}


def decode(body: dict[str, Any]) -> Offer | Go | Reject:
    """`encode`'s message back; ValueError for anything else."""
    try:
        kind, key = body["t"], _unkey(body["key"])
        if kind == "offer":
            return Offer(key, tuple(int(n) for n in body["sizes"]), int(body["g"]))
        if kind == "go":
            return Go(key, tuple(int(n) for n in body["chunks"]), int(body["seq"]), int(body["g"]))
        if kind == "reject":
            return Reject(key, RejectCode(body["code"]), str(body["reason"]), int(body["posted"]))
    except (KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"malformed control message {body!r}") from exc
    raise ValueError(f"unknown control message kind {kind!r}")


class LinkControl:
    """The control plane to the peer at the other end of `link` (see the module docstring)."""

    def __init__(self, link: Transport, device: str, on_reset: Callable[[str, int], None]) -> None:
        self._link = link
        self._on_reset = on_reset
        self.resets = 0  # `reset`s received
        self._cond = threading.Condition()
        self._down = ""
        self._device = ""
        self._ids: list[tuple[int, bytes]] = []
        self._offers: dict[bytes, deque[Offer]] = {}
        self._answers: dict[TransferKey, Go | Reject] = {}
        self._send_lock = threading.Lock()
        self._sent = 0
        self._reader = threading.Thread(target=self._read_loop, name="pdkv-nccl-control", daemon=True)
        self._reader.start()
        self._post({"t": "hello", "device": device}, 5.0)

    # ---- `nccl.Control` for the one peer of this link ----

    def device_of(self, peer: Endpoint, timeout: float) -> str:
        return self._take(lambda: self._device or None, timeout, "the peer's device")

    def exchange_id(
        self, peer: Endpoint, generation: int, unique_id: bytes | None, timeout: float
    ) -> tuple[int, bytes]:
        if unique_id is not None:
            self._post({"t": "id", "g": generation, "id": unique_id.hex()}, timeout)
            return generation, unique_id

        def newer() -> tuple[int, bytes] | None:
            fresh = [entry for entry in self._ids if entry[0] > generation]
            self._ids = [entry for entry in self._ids if entry[0] > generation]
            return max(fresh) if fresh else None

        return self._take(newer, timeout, f"a communicator id newer than generation {generation}")

    def offer(self, peer: Endpoint, offer: Offer, timeout: float) -> Go | Reject:
        self._post(encode(offer), timeout)
        return self._take(lambda: self._answers.pop(offer.key, None), timeout, f"an answer to {offer.key}")

    def next_offer(self, peer: Endpoint, slot: bytes, timeout: float) -> Offer:
        def first() -> Offer | None:
            waiting = self._offers.get(slot)
            return waiting.popleft() if waiting else None

        return self._take(first, timeout, f"an offer for {slot!r}")

    def answer(self, peer: Endpoint, answer: Go | Reject, timeout: float) -> None:
        self._post(encode(answer), timeout)

    # ----

    def reset(self, reason: str, maker_generation: int, timeout: float) -> None:
        """Tell the peer this side aborted the pair's communicator built from `maker_generation`."""
        self._post({"t": "reset", "reason": reason, "g": maker_generation}, timeout)

    def wait_resets(self, count: int, timeout: float) -> bool:
        """Whether `count` resets were received (and handled) within `timeout`."""
        with self._cond:
            return self._cond.wait_for(lambda: self.resets >= count, timeout)

    @property
    def down(self) -> str:
        return self._down

    def _take(self, ready: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = ready()
                if got is not None:
                    return got
                if self._down:
                    raise PeerGone(f"the control link is down ({self._down}) while waiting for {what}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportTimeout(f"no {what} within {timeout:g}s")
                self._cond.wait(left)

    def _post(self, message: dict[str, Any], timeout: float) -> None:
        body = json.dumps(message).encode()
        with self._send_lock:
            n, self._sent = self._sent, self._sent + 1
            self._link.send(CONTROL_PREFIX + b"%dh" % n, [memoryview(_LENGTH.pack(len(body)))], timeout)
            self._link.send(CONTROL_PREFIX + b"%db" % n, [memoryview(body)], timeout)

    def _read_loop(self) -> None:
        try:
            for n in itertools.count():
                head = bytearray(_LENGTH.size)
                recv(self._link, CONTROL_PREFIX + b"%dh" % n, [memoryview(head)], _IDLE_S)
                body = bytearray(_LENGTH.unpack(head)[0])
                recv(self._link, CONTROL_PREFIX + b"%db" % n, [memoryview(body)], _IDLE_S)
                body = json.loads(body)
                if body.get("t") == "reset":
                    self._on_reset(f"the peer reset the pair: {body.get('reason', '')}", int(body["g"]))
                self._file(body)
        except (TransportError, ValueError) as exc:
            with self._cond:
                self._down = f"{type(exc).__name__}: {exc}"
                self._cond.notify_all()

    def _file(self, body: dict[str, Any]) -> None:
        with self._cond:
            kind = body.get("t")
            if kind == "hello":
                self._device = str(body["device"])
            elif kind == "reset":
                self.resets += 1
            elif kind == "id":
                self._ids.append((int(body["g"]), bytes.fromhex(body["id"])))
            else:
                message = decode(body)
                if isinstance(message, Offer):
                    self._offers.setdefault(message.key.slot, deque()).append(message)
                else:
                    self._answers[message.key] = message
            self._cond.notify_all()


class Controls:
    """`nccl.Control` for a worker's every peer: each call goes to the `LinkControl` of the peer it names."""

    def __init__(self) -> None:
        self._by_peer: dict[str, LinkControl] = {}
        self._lock = threading.Lock()

    def add(self, peer: Endpoint, control: LinkControl) -> None:
        with self._lock:
            self._by_peer[peer.instance_id] = control

    def remove(self, peer: Endpoint, control: LinkControl) -> None:
        with self._lock:
            if self._by_peer.get(peer.instance_id) is control:
                del self._by_peer[peer.instance_id]

    def _of(self, peer: Endpoint) -> LinkControl:
        with self._lock:
            control = self._by_peer.get(peer.instance_id)
        if control is None:
            raise PeerGone(f"no control link to {peer}")
        return control

    def device_of(self, peer: Endpoint, timeout: float) -> str:
        return self._of(peer).device_of(peer, timeout)

    def exchange_id(
        self, peer: Endpoint, generation: int, unique_id: bytes | None, timeout: float
    ) -> tuple[int, bytes]:
        return self._of(peer).exchange_id(peer, generation, unique_id, timeout)

    def offer(self, peer: Endpoint, offer: Offer, timeout: float) -> Go | Reject:
        return self._of(peer).offer(peer, offer, timeout)

    def next_offer(self, peer: Endpoint, slot: bytes, timeout: float) -> Offer:
        return self._of(peer).next_offer(peer, slot, timeout)

    def answer(self, peer: Endpoint, answer: Go | Reject, timeout: float) -> None:
        self._of(peer).answer(peer, answer, timeout)
