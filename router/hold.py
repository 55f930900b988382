"""`HoldQueue`: places each leg of a request on a decode (or colocated) instance, holding it until one has KV
room for it.

`place` asks the policy for an instance; the instance then holds the request (`Held`: its KV now, its predicted
output still to come) until `release`, which the caller owes exactly once per `place` that returned. When the
policy finds no instance with room for the request's projected load (`Overloaded`), the request waits for
some request to end anywhere (a `release`) and asks again, never past its deadline (`DeadlineExceeded`). At
most `capacity` requests wait at once; one more is refused with the policy's `Overloaded` and retry hint, and so
is a request that no ending request can make room for (it fits no empty instance, or nothing is held).
"""

from __future__ import annotations

import asyncio

from common.errors import DeadlineExceeded, Overloaded
from router.metrics import RouterMetrics
from router.placement import Placement, Policy
from router.registry import Held, Instance, Registry
from router.run import Run


class HoldQueue:
    def __init__(self, registry: Registry, policy: Policy, capacity: int, metrics: RouterMetrics) -> None:
        self.registry = registry
        self.policy = policy  # decode (or colocated) placement; may be replaced between requests
        self.capacity = capacity
        self.metrics = metrics
        self._holding = 0  # requests waiting for KV room
        self._room = asyncio.Event()  # set (and replaced) whenever a request leaves an instance

    async def place(self, role: str, run: Run) -> Instance:
        """The instance of `role` for the run's next leg, which holds the request from now until `release`."""
        placement = run.placement()
        while True:
            try:
                instance = self.registry.pick(self.policy, role, placement)
                break
            except Overloaded:
                if self._holding >= self.capacity or not self._may_fit(role, placement):
                    raise  # the queue is full, or no request that ends can make room for it
                await self._wait_for_room(run.request.deadline)
        run.held = instance.held[run.leg_id] = Held(placement.prompt_tokens, placement.max_tokens, placement.length)
        return instance

    def release(self, instance: Instance, run: Run) -> None:
        """The run's leg left `instance`: its KV is free, and the requests waiting for room ask again."""
        instance.held.pop(run.leg_id, None)
        run.held = None
        room, self._room = self._room, asyncio.Event()
        room.set()

    def _may_fit(self, role: str, placement: Placement) -> bool:
        """Whether the request could fit once some held requests end: it fits an empty instance of the largest
        capacity (its projected peak there is its prompt plus its predicted output), and some request is held."""
        instances = self.registry.placeable(role)
        need = placement.prompt_tokens + placement.length.p90
        return any(i.held for i in instances) and need <= max((i.kv_capacity_tokens for i in instances), default=0)

    async def _wait_for_room(self, deadline: float | None) -> None:
        self._holding += 1
        self.metrics.held.inc()
        try:
            async with asyncio.timeout_at(deadline):
                await self._room.wait()
        except TimeoutError:
            raise DeadlineExceeded("the request's deadline passed while it waited for KV room on a decode "
                                   "instance") from None
        finally:
            self._holding -= 1
            self.metrics.held.dec()
