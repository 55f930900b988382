"""The `nccl` transport as serving uses it: a tcp `Link` per pair whose layer messages travel over NCCL.

Each prefill/decode pair keeps its authenticated tcp link (dialed, fenced by epoch and dropped exactly as the tcp
transport's): it carries the pair's control plane (`nccl_control.LinkControl`) while the layers' bytes go through
the worker's one `NcclLink`, whose pool holds one communicator per peer, built lazily on the first transfer,
aborted on a deadline or a dead peer and rebuilt on the next transfer. So `Sender` and `Receiver` drive it like any
transport: `send(layer_key, ...)` on the prefill, `expect` then `wait` on the decode (the wait runs the receive).

Unlike tcp and shm nothing is stashed: a layer moves once the decode side has posted its destination, so the
prefill's send waits for the decode request (at most until the transfer's deadline), and a link that closes aborts
its pair's communicator (what the control plane would have ordered is lost with it).

    plane = NcclPlane(NcclConfig(endpoint), CupyBackend(device))
    listener = listen(transport_config, plane, host, port)          # decode: hand to a `Receiver`
    link = connect((host, port), transport_config, plane, timeout)  # prefill (`Dial` for a `Sender`)
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kv_transfer import tcp
from kv_transfer.auth import authenticate
from kv_transfer.communicator import Backend
from kv_transfer.link import Link, Listener, Setup, establish
from kv_transfer.nccl import NcclConfig, NcclLink
from kv_transfer.nccl_control import Controls, LinkControl, is_control
from kv_transfer.nccl_keys import TransferKey
from kv_transfer.tcp import InlinePayload
from kv_transfer.transport import PeerGone, TransportConfig, TransportError, TransportTimeout, check_key
from kv_transfer.wire import SocketIO


@dataclass
class NcclPlane:
    """A worker's NCCL side: its one `NcclLink` (and pool) and the control links of its peers."""

    config: NcclConfig
    backend: Backend
    controls: Controls = field(default_factory=Controls)
    link: NcclLink = field(init=False)

    def __post_init__(self) -> None:
        self.link = NcclLink(self.config, self.controls, self.backend)

    def close(self) -> None:
        self.link.close()


def transfer_key(key: bytes, epoch: int) -> TransferKey:
    """The NCCL key of a layer message (`params.layer_key`: "<transfer id>/<layer>") from the sender of `epoch`."""
    transfer_id, _, layer = check_key(key).decode().rpartition("/")
    if not layer.isdigit():
        raise ValueError(f"not a layer key: {key!r}")
    return TransferKey(transfer_id, epoch, int(layer))


class NcclTransport(Link):
    """A tcp link carrying the control plane, with its layer messages on the worker's `NcclLink`."""

    __slots__ = ("_control", "_plane", "_posted")

    def __init__(self, io: SocketIO, peer: Any, config: TransportConfig, plane: NcclPlane) -> None:
        super().__init__(io, peer, InlinePayload(), config)
        self._plane = plane
        self._posted: dict[bytes, Sequence[Any]] = {}
        self._control = LinkControl(self, plane.backend.device_uuid(), lambda why, g: plane.link.reset(peer, why, g))
        plane.controls.add(peer, self._control)

    def send(self, key: bytes, buffers: Sequence[Any], timeout: float) -> None:
        if is_control(key):
            return super().send(key, buffers, timeout)
        me = self._plane.config.endpoint
        self._check_open()
        self._plane.link.send(self.peer, transfer_key(key, me.epoch), buffers, timeout)

    def expect(self, key: bytes, into: Sequence[Any]) -> None:
        if is_control(key):
            return super().expect(key, into)
        self._posted[check_key(key)] = into

    def wait(self, key: bytes, timeout: float, arrivals: list[float] | None = None) -> int:
        if is_control(key):
            return super().wait(key, timeout, arrivals)
        into = self._posted.pop(check_key(key), None)
        if into is None:
            raise ValueError(f"wait for key {key!r} without an expect")
        if timeout <= 0:  # withdrawing: nothing was put on the communicator for it yet
            raise TransportTimeout(f"key {key!r}: no time left to receive it")
        self._check_open()
        try:
            nbytes = self._plane.link.recv(self.peer, transfer_key(key, self.peer.epoch), into, timeout)
        except (TransportTimeout, PeerGone) as exc:  # the communicator was aborted: the sender's must go too
            with contextlib.suppress(TransportError):
                generation = self._plane.link.maker_generation(self.peer)
                self._control.reset(str(exc), generation, self._plane.config.control_timeout_s)
            raise
        if arrivals is not None:
            arrivals.append(time.time())  # a receive lands in the posted views: it arrived as it ended
        return nbytes

    @property
    def control(self) -> LinkControl:
        return self._control

    def close(self) -> None:
        self._plane.controls.remove(self.peer, self._control)
        super().close()
        self._plane.link.reset(self.peer, "its control link closed")

    def _check_open(self) -> None:
        if not self.is_up or self._control.down:
            raise PeerGone(f"the link to {self.peer} is down")


def _setup(config: TransportConfig, plane: NcclPlane) -> Setup:
    def setup(sock: socket.socket, dialer: bool) -> Link:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = authenticate(sock, config, dialer)
        return NcclTransport(SocketIO(sock, config.stall_timeout_s), peer, config, plane)

    return setup


def listen(config: TransportConfig, plane: NcclPlane, host: str = "127.0.0.1", port: int = 0,
           ) -> Listener[tuple[str, int]]:
    """A decode worker's listener for control links; its `address` is the `(host, port)` to dial."""
    sock = socket.create_server((host, port), backlog=64)
    host, port = sock.getsockname()[:2]
    return Listener(sock, (host, port), _setup(config, plane))


def connect(address: tuple[str, int], config: TransportConfig, plane: NcclPlane, timeout: float) -> Link:
    """A prefill worker's link to the decode worker at `address`; `TransportTimeout` past `timeout`."""
    return establish(tcp.dial(address, timeout), _setup(config, plane), dialer=True)
