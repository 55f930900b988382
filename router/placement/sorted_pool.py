"""`SortedPool`: a policy's instances kept in score order across picks, re-sorted only where a snapshot changed.
Pure code over snapshots."""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable, Sequence
from itertools import compress
from operator import is_not
from typing import Generic, TypeVar

from router.placement.snapshot import InstanceSnapshot

T = TypeVar("T")


class SortedPool(Generic[T]):
    """The eligible snapshots of the last call in ascending `key` order, re-sorted only where a snapshot changed.

    A policy passes every pick's full snapshot list to `update`; entries are compared by identity with the
    previous call's, so a publisher that rebuilds only the snapshots that changed (the simulator) costs one
    identity pass at C speed plus O(log n) per changed one, and one that rebuilds them all (the router) costs a
    sort. `prepare` maps an eligible snapshot to its key and to what the policy keeps of it (`items[i]`).
    """

    __slots__ = ("_prepare", "_seen", "changed", "items", "keys", "order")

    def __init__(self, prepare: Callable[[InstanceSnapshot], tuple[float, T]]) -> None:
        self._prepare = prepare
        self._seen: list[InstanceSnapshot] = []
        self.keys: list[float | None] = []  # None: not eligible
        self.items: list[T | None] = []
        self.order: list[tuple[float, int]] = []  # (key, position) of the eligible, ascending
        self.changed: list[int] | None = None  # positions the last update changed; None: it rebuilt them all

    def update(self, snapshots: Sequence[InstanceSnapshot]) -> None:
        n = len(snapshots)
        changed = list(compress(range(n), map(is_not, snapshots, self._seen))) if n == len(self._seen) else None
        self.changed = changed
        if changed is None or len(changed) * 8 > n:
            self._seen, self.keys, self.items, self.changed = list(snapshots), [None] * n, [None] * n, None
            for i, s in enumerate(snapshots):
                if s.healthy and not s.draining:
                    self.keys[i], self.items[i] = self._prepare(s)
            self.order = sorted((k, i) for i, k in enumerate(self.keys) if k is not None)
            return
        for i in changed:
            old, s = self.keys[i], snapshots[i]
            if old is not None:
                del self.order[bisect_left(self.order, (old, i))]
            self._seen[i], self.keys[i], self.items[i] = s, None, None
            if s.healthy and not s.draining:
                key, self.items[i] = self._prepare(s)
                self.keys[i] = key
                insort(self.order, (key, i))
