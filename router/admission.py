"""Admission: hold requests no instance can take now in a bounded FIFO queue. `BoundedQueue` and `Gate` are
pure, with no clock of their own; `admitted` is the asyncio wait around a `Gate`.

`BoundedQueue`: `offer` holds an item or raises `Overloaded` (RESOURCE_EXHAUSTED) once `capacity` items wait;
`drain(try_place)` places held items in arrival order and stops at the first one that still does not fit
(`try_place` returns False), so a large request at the head is not starved by smaller ones behind it;
`expire(expired)` takes out the oldest items while they are past a deadline the caller judges.

`Gate`: the router's admission. At most `slots` requests run at once (0: no limit); the next `queue` wait in
arrival order; one more is refused with `Overloaded`, whose retry hint grows with the queue:
`retry_after_s * (1 + waiting / slots)`. The state machine of one request:

    enter -> running                     (a slot was free)
    enter -> waiting -> running          (`leave` of another request handed it the slot)
    enter -> waiting -> withdrawn        (its client went away or its deadline passed first)
    enter -> refused (Overloaded)        (the queue was full)
    running -> `leave` (exactly once, on every exit path)

`admitted(gate, deadline)`: that machine for one request as an async context manager: it runs the body in a
slot, waiting in the queue first (until `deadline`: `DeadlineExceeded`) when none is free, and leaves exactly
once whichever way the body or the wait ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

from common.errors import DeadlineExceeded, Overloaded

T = TypeVar("T")


class BoundedQueue(Generic[T]):
    def __init__(self, capacity: int, retry_after_s: float = 1.0) -> None:
        if capacity < 0:
            raise ValueError(f"admission queue capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self._items: deque[T] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, item: T, retry_after_s: float | None = None) -> None:
        if len(self._items) >= self.capacity:
            hint = self.retry_after_s if retry_after_s is None else retry_after_s
            raise Overloaded(
                f"the server is at capacity and {len(self._items)} requests already wait; retry in {hint:.2f} s",
                retry_after_s=hint,
            )
        self._items.append(item)

    def drain(self, try_place: Callable[[T], bool]) -> list[T]:
        """Places held items in order until one does not fit; returns those placed."""
        placed: list[T] = []
        while self._items and try_place(self._items[0]):
            placed.append(self._items.popleft())
        return placed

    def expire(self, expired: Callable[[T], bool]) -> list[T]:
        """Takes out the oldest items while `expired` holds for them; returns them, oldest first."""
        gone: list[T] = []
        while self._items and expired(self._items[0]):
            gone.append(self._items.popleft())
        return gone

    def pop(self) -> T | None:
        """The oldest item, taken out of the queue; None when empty."""
        return self._items.popleft() if self._items else None

    def remove(self, item: T) -> bool:
        """Takes `item` out wherever it waits; False when it is not (or no longer) there."""
        try:
            self._items.remove(item)
        except ValueError:
            return False
        return True


class Gate(Generic[T]):
    """Bounds the requests running at once and those waiting for a slot (see the module's state machine)."""

    def __init__(self, slots: int, queue: int, retry_after_s: float = 1.0) -> None:
        if slots < 0:
            raise ValueError(f"admission slots must be >= 0 (0: no limit), got {slots}")
        if not retry_after_s > 0:
            raise ValueError(f"admission retry_after_s must be > 0, got {retry_after_s}")
        self.slots = slots
        self.retry_after_s = retry_after_s
        self.running = 0
        self._waiting: BoundedQueue[T] = BoundedQueue(queue, retry_after_s)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def hint(self) -> float:
        """Seconds after which a refused request may find room: longer the more requests already wait."""
        return self.retry_after_s * (1 + self.waiting / max(1, self.slots))

    def enter(self, waiter: T) -> bool:
        """True: the request runs now. False: `waiter` waits; a later `leave` returns it. Overloaded: refused."""
        if self.slots == 0 or (self.running < self.slots and not self.waiting):
            self.running += 1
            return True
        self._waiting.offer(waiter, self.hint())
        return False

    def withdraw(self, waiter: T) -> bool:
        """A waiting request gives up; False when `leave` already handed it a slot (it must `leave` in turn)."""
        return self._waiting.remove(waiter)

    def leave(self) -> T | None:
        """A running request ended; returns the waiter its slot passes to (which now counts as running)."""
        if self.running < 1:
            raise RuntimeError("admission: leave() without a matching enter()")
        successor = self._waiting.pop()
        if successor is None:
            self.running -= 1
        return successor


@contextlib.asynccontextmanager
async def admitted(gate: Gate[asyncio.Future[None]], deadline: float | None) -> AsyncIterator[None]:
    """Holds one of the gate's slots while the body runs; waits in its queue (until `deadline`, on the monotonic
    clock; None: no deadline) first when none is free."""
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    if not gate.enter(waiter):  # Overloaded when the queue is full
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except BaseException as e:
            if not gate.withdraw(waiter):  # the slot was handed over as the wait ended: pass it on
                _pass_on(gate.leave())
            if isinstance(e, TimeoutError):
                raise DeadlineExceeded("the request's deadline passed while it waited for admission") from None
            raise
    try:
        yield
    finally:
        _pass_on(gate.leave())


def _pass_on(successor: asyncio.Future[None] | None) -> None:
    # A waiter cancelled a moment ago is done already; it sees the slot was handed over and passes it on.
    if successor is not None and not successor.done():
        successor.set_result(None)
