"""Admission: hold requests no instance can take now in a bounded FIFO queue. Pure, no clock of its own.

Contract: `offer` holds an item or raises `Overloaded` (RESOURCE_EXHAUSTED) once `capacity` items wait;
`drain(try_place)` places held items in arrival order and stops at the first one that still does not fit
(`try_place` returns False), so a large request at the head is not starved by smaller ones behind it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from pdserve.router.errors import Overloaded

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
