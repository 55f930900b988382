"""`Sender`: the prefill worker's outgoing KV, one message per (request, layer), on one background thread.

The engine's forward pass hands over each layer as soon as that layer's KV is written (`submit`), and goes on
computing the next layer while the thread puts the bytes on the link: that is the layer-wise overlap. The
views point into the engine's paged KV blocks; the scheduler keeps those blocks until `completed` has
reported the request (`Outgoing.done`), successful or not.

Links are dialed on first use, one per decode address, and dropped when they break; the next request dials
again. A send that fails (peer gone, stalled past the request's deadline) fails only its request: the rest of
that request's layers are skipped, and the decode side, which never sees them land, recomputes.

Whether each transfer's link came up is reported as soon as its first layer was handled (`dialed`): the prefill
worker tells the router at once that KV which could not even be dialed will not come, so the decode side
recomputes at once instead of waiting out the deadline. The transfers to a peer that were queued before a dial to it
failed fail at once with the same error, rather than each waiting out the connect timeout in turn on this one
thread; a transfer queued later dials again.

Fault injection (`fault_every`, 0 by default: off; `pdserve chaos` turns it on): every n-th transfer fails on
purpose, alternately as a dropped connection (its first layer is sent, then the link is closed under it) and
as a stalled peer (nothing is sent; the decode side waits out the transfer's deadline).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kv_transfer.dial import reason
from kv_transfer.drain import drain
from kv_transfer.params import SendSpec, layer_key
from kv_transfer.transport import PeerGone, Transport, TransportError, TransportTimeout

DROP, STALL = "drop", "stall"  # the injected faults
Dial = Callable[[str, float], Transport]  # (address, timeout) -> an authenticated link


@dataclass(slots=True, eq=False)
class Outgoing:
    """One request's KV on its way out. Written by the sender thread until `done`."""

    req_id: str
    spec: SendSpec
    layers: int
    handled: int = 0
    bytes: int = 0
    first_send: float = 0.0  # wall-clock times
    last_send: float = 0.0
    compute_end: float = 0.0  # when the forward that computed the KV returned
    send_seconds: list[float] = field(default_factory=list)  # each sent layer's time inside the link's send
    error: str = ""
    queued: float = 0.0  # monotonic time its first layer was submitted
    dialed: bool = False  # whether its link's outcome was reported (`Sender.dialed`)
    done: bool = False

    def record(self) -> dict[str, object]:
        return {
            "transfer_id": self.spec.transfer_id, "bytes": self.bytes, "busy": sum(self.send_seconds),
            "layers": len(self.send_seconds),
            "first_send": self.first_send, "last_send": self.last_send, "compute_end": self.compute_end,
            "send_seconds": list(self.send_seconds), "error": self.error,
        }


class Sender:
    def __init__(self, dial: Dial, connect_timeout_s: float, fault_every: int = 0) -> None:
        self._dial = dial
        self._fault_every = fault_every
        self._transfers = 0  # transfers begun, for fault injection
        self._connect_timeout = connect_timeout_s
        self._links: dict[str, Transport] = {}
        self._failed: dict[str, tuple[float, TransportError]] = {}  # address -> (when a dial failed, why), monotonic
        self._dials: queue.SimpleQueue[dict[str, object]] = queue.SimpleQueue()
        self._work: queue.SimpleQueue[tuple[Outgoing, int, Sequence[memoryview]] | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[Outgoing] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="pdkv-sender", daemon=True)
        self._thread.start()

    def submit(self, out: Outgoing, layer: int, views: Sequence[memoryview]) -> None:
        out.queued = out.queued or time.monotonic()
        self._work.put((out, layer, views))

    def completed(self, timeout: float = 0.0) -> list[Outgoing]:
        """Requests whose every layer was handled since the last call; waits up to `timeout` for the first one."""
        return drain(self._done, timeout)

    def dialed(self, timeout: float = 0.0) -> list[dict[str, object]]:
        """Since the last call, per transfer whose first layer was handled: whether its link came up; waits up to
        `timeout` seconds for the first one.

        {"transfer_id", "ok", "peer", "peer_instance", "reason", "error"}; `reason` as `kv_transfer.dial.reason`.
        """
        return drain(self._dials, timeout)

    def close(self) -> None:
        self._work.put(None)
        self._thread.join(timeout=5.0)
        for link in self._links.values():
            link.close()
        self._links.clear()

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            out, layer, views = item
            if not out.error:
                self._send(out, layer, views)
            out.handled += 1
            if out.handled == out.layers:
                out.done = True
                self._done.put(out)

    def _send(self, out: Outgoing, layer: int, views: Sequence[memoryview]) -> None:
        fault = self._fault(out)
        if fault == STALL:
            out.error = "injected fault: stalled peer"
            self._report(out, None)  # the peer is there; it is the transfer that stalls
            return
        start = time.time()
        try:
            link = self._connect(out, layer, start)
            try:
                link.send(layer_key(out.spec.transfer_id, layer), views, out.spec.deadline - time.time())
            except PeerGone:
                self._drop(out.spec.peer)
                raise
        except TransportError as e:
            out.error = f"{type(e).__name__}: {e}"
            return
        out.first_send = out.first_send or start
        out.last_send = time.time()
        out.send_seconds.append(out.last_send - start)
        out.bytes += sum(v.nbytes for v in views)  # host memoryviews or device tensors
        if fault == DROP:
            self._drop(out.spec.peer)
            out.error = "injected fault: dropped connection"

    def _fault(self, out: Outgoing) -> str:
        """The fault to inject into this send, if any: decided once per transfer, at its first layer."""
        if not self._fault_every or out.handled:
            return ""
        self._transfers += 1
        if self._transfers % self._fault_every:
            return ""
        return DROP if (self._transfers // self._fault_every) % 2 else STALL

    def _connect(self, out: Outgoing, layer: int, now: float) -> Transport:
        """The link for `out`'s peer; the first layer of a transfer reports how that went."""
        try:
            timeout = out.spec.deadline - now
            if timeout <= 0:
                raise TransportTimeout(f"the transfer's deadline passed before layer {layer} was sent")
            link = self._link(out.spec.peer, min(timeout, self._connect_timeout), out.queued)
        except TransportError as e:
            self._report(out, e)
            raise
        self._report(out, None)
        return link

    def _report(self, out: Outgoing, error: TransportError | None) -> None:
        if out.dialed:
            return
        out.dialed = True
        self._dials.put({
            "transfer_id": out.spec.transfer_id, "ok": error is None, "peer": out.spec.peer,
            "peer_instance": out.spec.peer_instance, "reason": "" if error is None else reason(error),
            "error": "" if error is None else f"{type(error).__name__}: {error}",
        })

    def _link(self, address: str, timeout: float, queued: float) -> Transport:
        """The link to `address`, dialed if need be; a transfer `queued` before a dial to it failed fails alike."""
        link = self._links.get(address)
        if link is not None and not getattr(link, "is_up", True):
            self._drop(address)  # its peer hung up or restarted since: dial afresh rather than fail this transfer
            link = None
        if link is None:
            failed, why = self._failed.get(address, (0.0, None))
            if why is not None and queued <= failed:
                raise why
            try:
                link = self._dial(address, timeout)
            except TransportError as e:
                self._failed[address] = (time.monotonic(), e)
                raise
            self._failed.pop(address, None)
            self._links[address] = link
        return link

    def _drop(self, address: str) -> None:
        link = self._links.pop(address, None)
        if link is not None:
            link.close()
