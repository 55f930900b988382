"""The receive side of a link: where each key's bytes land, and who is waiting for them.

Each key has one entry, driven by two parties, the user (`post`, `wait`) and the link's reader thread
(`begin`, `finish`, `fail`):

    post ----------> POSTED --begin--> ARRIVING (into the posted buffers) --finish--> LANDED --wait--> (gone)
    begin (no post) -------------------> ARRIVING (into a stash) --finish--> LANDED (stash) --post: copy--^
    begin with the wrong size ---------------------------------------------> FAILED (SizeMismatch)
    link fails: every POSTED or ARRIVING entry -----------------------------> FAILED (the link's error)

Contract:
- The reader writes user memory only through a `Landing`, under its lock, and checks `withdrawn` under that same
  lock first. `wait` that times out sets `withdrawn` under the lock, so once it raises, nothing writes `into`.
- A withdrawn key's late bytes are discarded; unposted arrivals are stashed up to `max_stash_bytes`, beyond which
  the peer is cut off (`FrameError`): a receiver that never posts cannot be made to buffer without bound.
- Stash buffers are recycled: a stash that was copied out, or dropped once whole, goes back to a small pool (at
  most an eighth of `max_stash_bytes`) and a later stash of about its size reuses it. Fresh buffers would page-fault
  on every message, which costs as much as a tenth of the receive bandwidth at a KV layer's size.
- `drop_stash` frees unclaimed stashes (a lease ran out, or the transfer was called off); their keys' later bytes
  are discarded like a withdrawn key's.
- Lock order: inbox lock, then a landing's lock; never the other way round.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from kv_transfer.transport import FrameError, PeerGone, SizeMismatch, TransportError, TransportTimeout

MAX_WITHDRAWN_KEYS = 4096
_SCRATCH = bytearray(1 << 20)  # discarded bytes land here; only reader threads write it, nobody reads it


class _State(enum.Enum):
    POSTED = "posted"
    ARRIVING = "arriving"
    LANDED = "landed"
    FAILED = "failed"


class Landing:
    """A cursor over the buffers one message lands in; writes go to scratch once withdrawn."""

    __slots__ = ("_idx", "_off", "_views", "lock", "withdrawn")

    def __init__(self, views: list[memoryview], withdrawn: bool = False) -> None:
        self._views = [v for v in views if len(v)]
        self._idx = 0
        self._off = 0
        self.lock = threading.Lock()
        self.withdrawn = withdrawn

    def region(self, most: int) -> memoryview:
        """Where the next bytes go, at most `most` of them. Call with `lock` held."""
        if self.withdrawn:
            return memoryview(_SCRATCH)[: min(most, len(_SCRATCH))]
        view = self._views[self._idx]
        return view[self._off : self._off + most]

    def advance(self, n: int) -> None:
        if self.withdrawn:
            return
        self._off += n
        if self._off == len(self._views[self._idx]):
            self._idx, self._off = self._idx + 1, 0

    def write(self, src: memoryview) -> None:
        """Copy `src` at the cursor. Call with `lock` held."""
        while len(src):
            region = self.region(len(src))
            n = len(region)
            region[:] = src[:n]
            self.advance(n)
            src = src[n:]


def _discard() -> Landing:
    return Landing([], withdrawn=True)


@dataclass(slots=True, eq=False)
class _Entry:
    state: _State
    length: int
    posted: list[memoryview] | None = None
    stash: memoryview | None = None  # `length` bytes of a buffer taken from `_Buffers`
    landing: Landing | None = None
    error: TransportError | None = None
    since: float = 0.0  # monotonic time the stash began
    arrived: float = 0.0  # wall-clock time the message had fully arrived (stash or posted views)
    done: threading.Event = field(default_factory=threading.Event)


class _Buffers:
    """Stash buffers to reuse, whose pages are already in memory; at most `limit` bytes of them."""

    __slots__ = ("_free", "_held", "_limit")

    def __init__(self, limit: int) -> None:
        self._free: list[bytearray] = []
        self._held = 0
        self._limit = limit

    def take(self, length: int) -> memoryview:
        """`length` bytes: the smallest free buffer that fits and wastes at most half of itself, else a new one."""
        fits = [i for i, buf in enumerate(self._free) if length <= len(buf) <= 2 * length]
        if not fits:
            return memoryview(bytearray(length))
        buf = self._free.pop(min(fits, key=lambda i: len(self._free[i])))
        self._held -= len(buf)
        return memoryview(buf)[:length]

    def give(self, stash: memoryview) -> None:
        """`stash` is no longer read or written by anyone."""
        buf = stash.obj
        assert isinstance(buf, bytearray)
        if self._held + len(buf) <= self._limit:
            self._free.append(buf)
            self._held += len(buf)


class Inbox:
    __slots__ = ("_buffers", "_entries", "_failure", "_lock", "_max_stash", "_stashed", "_withdrawn")

    def __init__(self, max_stash_bytes: int) -> None:
        self._lock = threading.Lock()
        self._entries: dict[bytes, _Entry] = {}
        self._withdrawn: OrderedDict[bytes, None] = OrderedDict()
        self._max_stash = max_stash_bytes
        self._stashed = 0
        self._buffers = _Buffers(max_stash_bytes // 8)
        self._failure: tuple[type[TransportError], str] | None = None

    def post(self, key: bytes, views: list[memoryview]) -> None:
        length = sum(len(v) for v in views)
        with self._lock:
            self._withdrawn.pop(key, None)
            entry = self._entries.get(key)
            if entry is None:
                if self._failure is not None:
                    raise PeerGone(f"the link is down: {self._failure[1]}")
                self._entries[key] = _Entry(_State.POSTED, length, posted=views)
                return
            if entry.posted is not None:
                raise ValueError(f"key {key!r} is already expected")
            entry.posted = views
            if entry.state is _State.LANDED:
                self._unstash(key, entry)

    def wait(self, key: bytes, timeout: float, arrivals: list[float] | None = None) -> int:
        """The message's length once it is in the posted views; `arrivals` (if given) gets the wall-clock time it
        had fully arrived, which for a stashed message is before it was copied out."""
        with self._lock:
            entry = self._entries.get(key)
        if entry is None or entry.posted is None:
            raise ValueError(f"wait for key {key!r} without an expect")
        if not entry.done.wait(timeout) and not self._withdraw(key, entry):
            raise TransportTimeout(f"key {key!r}: nothing landed within {timeout:g}s")
        with self._lock:
            self._entries.pop(key, None)
        if entry.error is not None:
            raise entry.error
        if arrivals is not None:
            arrivals.append(entry.arrived)
        return entry.length

    def _withdraw(self, key: bytes, entry: _Entry) -> bool:
        """Take `entry`'s buffers back after a timeout; True if it landed after all."""
        with self._lock:
            if entry.done.is_set():
                return True
            if entry.landing is not None:
                with entry.landing.lock:  # waits out the write in progress, if any
                    entry.landing.withdrawn = True
            self._drop(key, entry)
            self._remember_withdrawn(key)  # its bytes may still come: discard them
            return False

    def _drop(self, key: bytes, entry: _Entry) -> None:
        self._entries.pop(key, None)
        if entry.stash is not None:
            self._stashed -= len(entry.stash)
            if entry.state is _State.LANDED:  # else the reader may still be writing it
                self._buffers.give(entry.stash)
            entry.stash = None

    def holds(self, key: bytes) -> bool:
        """Whether `key`'s message has landed whole and waits, unposted, in the stash."""
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and entry.state is _State.LANDED and entry.posted is None

    @property
    def stashed_bytes(self) -> int:
        return self._stashed

    def drop_stash(self, doomed: Callable[[bytes, float], bool]) -> int:
        """Frees every unclaimed stash for which `doomed(key, since)` holds; returns the bytes freed."""
        freed = 0
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry.posted is not None or entry.stash is None or not doomed(key, entry.since):
                    continue
                if entry.landing is not None:
                    with entry.landing.lock:  # an arriving stash: the rest of its bytes go to scratch
                        entry.landing.withdrawn = True
                freed += len(entry.stash)
                self._drop(key, entry)
                self._remember_withdrawn(key)
        return freed

    def cancel(self, keys: list[bytes], error: TransportError) -> None:
        """Fails the waits on these posted keys now (their transfer was called off); nothing writes them later."""
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is None or entry.posted is None or entry.state not in (_State.POSTED, _State.ARRIVING):
                    continue
                self._remember_withdrawn(key)
                self._fail_entry(entry, error)

    def refuse(self, keys: list[bytes]) -> None:
        """Discards whatever arrives later for `keys` that nobody posted (a transfer that was called off)."""
        with self._lock:
            for key in keys:
                if key not in self._entries:
                    self._remember_withdrawn(key)

    def _remember_withdrawn(self, key: bytes) -> None:
        self._withdrawn[key] = None
        while len(self._withdrawn) > MAX_WITHDRAWN_KEYS:
            self._withdrawn.popitem(last=False)

    def begin(self, key: bytes, length: int) -> Landing:
        """Reader: a message for `key` of `length` bytes starts; where to put it."""
        with self._lock:
            if key in self._withdrawn:
                del self._withdrawn[key]
                return _discard()
            entry = self._entries.get(key)
            if entry is None:
                return self._stash(key, length)
            if entry.state is not _State.POSTED:
                raise FrameError(f"the peer sent key {key!r} twice")
            if entry.length != length:
                entry.state, entry.error = _State.FAILED, SizeMismatch(key, length, entry.length)
                entry.done.set()
                return _discard()
            entry.state = _State.ARRIVING
            entry.landing = Landing(entry.posted or [])
            return entry.landing

    def _stash(self, key: bytes, length: int) -> Landing:
        if self._stashed + length > self._max_stash:
            raise FrameError(
                f"key {key!r}: {length} bytes arrived before any expect and the stash is full "
                f"({self._stashed} of {self._max_stash} bytes); post destinations before the peer sends"
            )
        self._stashed += length
        stash = self._buffers.take(length)
        landing = Landing([stash])
        entry = _Entry(_State.ARRIVING, length, stash=stash, landing=landing, since=time.monotonic())
        self._entries[key] = entry
        assert entry.landing is not None
        return entry.landing

    def finish(self, key: bytes, landing: Landing) -> None:
        """Reader: the message for `key` has fully arrived through `landing`."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.landing is not landing or landing.withdrawn:
                return
            entry.state = _State.LANDED
            entry.arrived = time.time()
            if entry.stash is None:
                entry.done.set()
            elif entry.posted is not None:
                self._unstash(key, entry)

    def _unstash(self, key: bytes, entry: _Entry) -> None:
        stash, entry.stash = entry.stash, None
        assert stash is not None and entry.posted is not None
        self._stashed -= len(stash)
        posted = sum(len(v) for v in entry.posted)
        if posted != len(stash):
            entry.state, entry.error = _State.FAILED, SizeMismatch(key, len(stash), posted)
        else:
            landing = entry.landing = Landing(entry.posted)
            with landing.lock:
                landing.write(stash)
        self._buffers.give(stash)
        entry.done.set()

    def fail(self, error: TransportError) -> None:
        """The link is down: fail every waiter (with the same kind of error) and refuse later posts."""
        with self._lock:
            if self._failure is None:
                self._failure = (type(error), str(error))
            kind, why = self._failure
            for key, entry in list(self._entries.items()):
                if entry.state in (_State.POSTED, _State.ARRIVING):
                    if entry.posted is None:  # an unclaimed partial stash: nobody will ever want it
                        self._drop(key, entry)
                        continue
                    self._fail_entry(entry, kind(why))

    @staticmethod
    def _fail_entry(entry: _Entry, error: TransportError) -> None:
        """Fences a posted entry off from the reader and wakes its waiter with `error`. Call with the lock held."""
        if entry.landing is not None:
            with entry.landing.lock:  # the reader may be mid-write: wait it out, then fence it off
                entry.landing.withdrawn = True
        entry.state, entry.error = _State.FAILED, error
        entry.done.set()
