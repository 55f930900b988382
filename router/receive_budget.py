"""`ReceiveBudget`: the router's account of KV in flight towards each decode instance's receive buffer.

A prefill may start only when the KV it will push fits in what is left of its decode instance's buffer; else
the request waits here (the router holds it) until earlier transfers are claimed. The decode side enforces the
same bound on its own (a link that overflows it is cut), so this account is what keeps that from happening.

`reserve` waits (asyncio, in arrival order per instance) and returns once the bytes are booked; `release`
gives them back once the decode engine has the KV, or the transfer ended otherwise. A request bigger than a
whole buffer can never fit: `TooLarge`.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict


class TooLarge(ValueError):
    pass


class ReceiveBudget:
    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 1:
            raise ValueError("a receive budget needs at least one byte")
        self.capacity = capacity_bytes
        self._used: dict[str, int] = defaultdict(int)
        self._freed: dict[str, asyncio.Condition] = defaultdict(asyncio.Condition)

    def used(self, instance_id: str) -> int:
        return self._used[instance_id]

    async def reserve(self, instance_id: str, nbytes: int) -> None:
        if nbytes > self.capacity:
            raise TooLarge(
                f"the prompt's KV ({nbytes} bytes) exceeds a decode instance's whole receive buffer "
                f"({self.capacity} bytes); raise transfer.receive_buffer_mib"
            )
        freed = self._freed[instance_id]
        async with freed:
            await freed.wait_for(lambda: self._used[instance_id] + nbytes <= self.capacity)
            self._used[instance_id] += nbytes

    async def release(self, instance_id: str, nbytes: int) -> None:
        freed = self._freed[instance_id]
        async with freed:
            self._used[instance_id] -= nbytes
            if self._used[instance_id] < 0:
                raise RuntimeError(f"{instance_id}: released more receive buffer than was reserved")
            freed.notify_all()
