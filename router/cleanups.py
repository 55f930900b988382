"""`Cleanups`: the aborts and releases the router sends to workers without waiting for them (a request's
cleanup must not hold up its caller), tracked until each is done so that `settle` can wait for them all."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Any


class Cleanups:
    def __init__(self) -> None:
        self._pending: set[Future[Any]] = set()

    def send(self, ref: Any) -> None:
        """Tracks `ref`, a Ray object ref of a call already sent to a worker, until it is done."""
        future = ref.future()
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    async def settle(self) -> None:
        """Waits until every call tracked so far has run (errors ignored)."""
        pending = [asyncio.wrap_future(f) for f in list(self._pending)]
        await asyncio.gather(*pending, return_exceptions=True)
