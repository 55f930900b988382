"""`drain`: take everything a worker thread has queued for the engine's thread, waiting a little for the first."""

from __future__ import annotations

import queue
from typing import TypeVar

T = TypeVar("T")


def drain(q: queue.SimpleQueue[T], timeout: float = 0.0) -> list[T]:
    """Every item in `q` now; with `timeout` > 0 an empty queue is waited on that long for a first item."""
    done = []
    if timeout > 0:
        try:
            done.append(q.get(timeout=timeout))
        except queue.Empty:
            return done
    while True:
        try:
            done.append(q.get_nowait())
        except queue.Empty:
            return done
