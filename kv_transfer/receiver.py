"""`Receiver`: the decode worker's incoming KV: its listeners, one link per prefill instance, and the loads.

Prefill workers dial the receiver's `address` (one route per listener: shared memory, tcp; see
`kv_transfer.address`) and prove the cluster secret. Each new connection authenticates on its own thread within
the handshake timeout, so peers that connect and say nothing never hold up a real one; at most `MAX_HANDSHAKES`
authenticate at once and connections beyond that are closed on arrival. Links are fenced by epoch: a link from a
newer incarnation of an instance replaces the old one (closed), and a link from an older incarnation than one
already seen is refused. A link that went down holding nothing (its peer hung up: a start-up probe, a prefill
worker that restarted) is closed and forgotten at the next accept tick.

The prefill usually finishes before the router asks the decode engine for the request, so a request's layers
mostly arrive before their destination is known: they wait in the link's stash, the receive buffer, bounded
by `max_stash_bytes` per link. A stash nobody claims within `lease_s` (the decode request never came) is
freed, as is every stash of a transfer the worker is told to `release`.

`load` posts a request's destination (the paged blocks the scheduler allocated, one list of views per layer)
and waits on a pool thread until every layer landed or the request's deadline passed; `completed` hands back
the outcomes. Each outcome says when the destination was posted, when the last layer was in it, and how many
layers had already landed whole in the stash before the post: when all of them had, `landed` is the time of the
copy out of the stash; `arrived` is when the last layer had arrived, stashed or not. A failed load leaves no key
posted: each one is withdrawn (a timed-out wait withdraws its key), so no late byte is written into blocks the
engine may reuse.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kv_transfer.drain import drain
from kv_transfer.endpoint import Epochs, StaleEpoch
from kv_transfer.link import Link, Listener
from kv_transfer.params import RecvSpec, layer_key
from kv_transfer.transport import TransportError, TransportTimeout

ACCEPT_POLL_S = 0.5  # how often the accept loop looks whether it should stop
MAX_HANDSHAKES = 16  # connections authenticating at once, per receiver; more are closed on arrival


@dataclass(slots=True)
class Landed:
    req_id: str
    transfer_id: str
    ok: bool
    bytes: int
    posted: float  # wall-clock time the destination was posted
    landed: float  # wall-clock time the last layer landed (or the load failed)
    error: str = ""
    layers: int = 0
    early_layers: int = 0  # layers already whole in the stash when the destination was posted
    arrived: float = 0.0  # wall-clock time the last layer had arrived (stashed or not); 0.0 for a failed load

    def record(self) -> dict[str, object]:
        return {"transfer_id": self.transfer_id, "ok": self.ok, "bytes": self.bytes, "posted": self.posted,
                "landed": self.landed, "error": self.error, "layers": self.layers, "early_layers": self.early_layers,
                "arrived": self.arrived}


class Receiver:
    def __init__(self, listeners: Sequence[Listener[Any]], address: str, lease_s: float, max_loads: int = 64) -> None:
        self.address = address
        self._listeners = list(listeners)
        self._lease = lease_s
        self._links: dict[str, Link] = {}
        self._epochs = Epochs()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._done: queue.SimpleQueue[Landed] = queue.SimpleQueue()
        self._pool = ThreadPoolExecutor(max_workers=max_loads, thread_name_prefix="pdkv-load")
        self._pending = 0
        self._handshakes = 0  # connections accepted and still authenticating
        self._accepters = [threading.Thread(target=self._accept_loop, args=(listener,), name="pdkv-accept",
                                            daemon=True) for listener in self._listeners]
        for accepter in self._accepters:
            accepter.start()

    def load(self, req_id: str, spec: RecvSpec, layers: Sequence[Sequence[memoryview]]) -> None:
        with self._changed:
            self._pending += 1
        self._pool.submit(self._load, req_id, spec, layers)

    def completed(self, timeout: float = 0.0) -> list[Landed]:
        """Loads finished since the last call; waits up to `timeout` seconds for the first one."""
        return drain(self._done, timeout)

    def release(self, transfer_ids: Sequence[str], num_layers: int) -> int:
        """Frees whatever arrived for these transfers and is not claimed, and refuses what is still to come.

        Returns the bytes freed.
        """
        keys = [layer_key(t, i) for t in transfer_ids for i in range(num_layers)]
        wanted = set(keys)
        freed = self._drop_stash(lambda key, since: key in wanted)
        called_off = TransportError("the transfer was called off")
        for link in self._current_links():
            link.refuse(keys)
            link.cancel(keys, called_off)  # a load already waiting for them gives up now
        return freed

    def expire(self, now: float | None = None) -> int:
        """Frees stashes older than the lease at `now` (time.monotonic(); default: the present); returns the bytes
        freed."""
        cutoff = (time.monotonic() if now is None else now) - self._lease
        return self._drop_stash(lambda key, since: since < cutoff)

    def _current_links(self) -> list[Link]:
        with self._changed:
            return list(self._links.values())

    def state(self) -> dict[str, int]:
        with self._changed:
            links = list(self._links.values())
            pending = self._pending
        return {"links": len(links), "stashed_bytes": sum(link.stashed_bytes for link in links),
                "pending_loads": pending}

    def close(self) -> None:
        self._stop.set()
        for listener in self._listeners:
            listener.close()
        for accepter in self._accepters:
            accepter.join(timeout=ACCEPT_POLL_S + 1.0)
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._changed:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()

    def _drop_stash(self, doomed: Callable[[bytes, float], bool]) -> int:
        return sum(link.drop_stash(doomed) for link in self._current_links())

    def _load(self, req_id: str, spec: RecvSpec, layers: Sequence[Sequence[memoryview]]) -> None:
        posted = time.time()
        keys = [layer_key(spec.transfer_id, i) for i in range(len(layers))]
        nbytes, error, early = 0, "", 0
        arrivals: list[float] = []  # when each layer had arrived
        try:
            link = self._link_for(spec.peer_instance, spec.deadline, keys[0])
            try:
                early = sum(link.holds(key) for key in keys)
                for key, views in zip(keys, layers, strict=True):
                    link.expect(key, views)
                for key in keys:
                    nbytes += link.wait(key, max(spec.deadline - time.time(), 0.0), arrivals)
            except TransportError:
                for key in keys:  # withdraw what is still posted: a timed-out wait takes its buffers back
                    with contextlib.suppress(TransportError, ValueError):
                        link.wait(key, 0.0)
                raise
        except TransportError as e:
            error = f"{type(e).__name__}: {e}"
        finally:
            with self._changed:
                self._pending -= 1
            arrived = max(arrivals) if not error and arrivals else 0.0
            self._done.put(Landed(req_id, spec.transfer_id, not error, nbytes, posted, time.time(), error, len(keys),
                                  early, arrived))

    def _link_for(self, instance_id: str, deadline: float, first_key: bytes) -> Link:
        """The peer's link: an up one, or a closed one that already holds this transfer's first layer (the peer
        may send everything it had and hang up before this load begins; the waits then report what it left)."""
        with self._changed:
            while True:
                link = self._links.get(instance_id)
                if link is not None and (link.is_up or link.holds(first_key)):
                    return link
                left = deadline - time.time()
                if left <= 0 or self._stop.is_set():
                    raise TransportTimeout(f"prefill instance {instance_id} never connected")
                self._changed.wait(left)

    def _forget_dead_links(self) -> None:
        with self._changed:
            dead = {iid: link for iid, link in self._links.items() if not link.is_up and not link.stashed_bytes}
            for iid in dead:
                del self._links[iid]
        for link in dead.values():
            link.close()

    def _accept_loop(self, listener: Listener[Any]) -> None:
        while not self._stop.is_set():
            self.expire()
            self._forget_dead_links()
            try:
                conn = listener.accept_connection(timeout=ACCEPT_POLL_S)
            except TransportError:
                continue  # nobody came: keep listening
            except OSError:
                return  # the listener was closed
            with self._changed:
                full = self._handshakes >= MAX_HANDSHAKES
                if not full:
                    self._handshakes += 1
            if full:  # that many peers that have not proved the secret yet: this one is turned away at once
                conn.close()
                continue
            threading.Thread(target=self._handshake, args=(listener, conn), name="pdkv-handshake",
                             daemon=True).start()

    def _handshake(self, listener: Listener[Any], conn: socket.socket) -> None:
        try:
            link = listener.handshake(conn)
        except (TransportError, OSError):
            return  # a peer without the secret, or one that said nothing within the handshake timeout
        finally:
            with self._changed:
                self._handshakes -= 1
        self._admit(link)

    def _admit(self, link: Link) -> None:
        peer = link.peer
        if self._stop.is_set():
            link.close()
            return
        with self._changed:
            try:
                self._epochs.admit(peer)
            except StaleEpoch:
                stale: Link | None = link  # an older incarnation than one already seen: turned away
            else:
                stale = self._links.get(peer.instance_id)  # the same or an older incarnation's link
                self._links[peer.instance_id] = link
                self._changed.notify_all()
        if stale is not None:
            stale.close()
