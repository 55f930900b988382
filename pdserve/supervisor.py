"""The supervisor: keeps the router's pool in step with the workers that are actually alive.

Every `interval_s` it asks each instance in the pool for its engine's stats (a heartbeat); an instance that does
not answer within `timeout_s` leaves the pool at once (the router also drops an instance whose calls fail with
UNAVAILABLE, and resumes its requests elsewhere). Ray restarts a worker whose process died; for every instance out
of the pool the supervisor calls `start()`, which on a restarted actor builds a fresh engine with a new epoch
(its KV links fence the dead incarnation's out), and then puts the instance back with its new addresses. A
worker that Ray will not restart stays out.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray.exceptions import ActorDiedError, RayError

from router.channel import WorkerChannel
from router.registry import Instance, Registry
from worker.binding import Binding

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, registry: Registry, secret: str, bindings: dict[str, Binding], interval_s: float = 1.0,
                 timeout_s: float = 10.0, start_timeout_s: float = 600.0) -> None:
        self._registry = registry
        self._secret = secret
        self._bindings = bindings  # by instance id: the cores it was started on (a restart starts on them again)
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._start_timeout_s = start_timeout_s
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._starting: dict[str, asyncio.Task[None]] = {}
        self._gone: set[str] = set()  # actors Ray will not restart

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="pdserve-supervisor")

    async def stop(self) -> None:
        for task in [self._task, *self._starting.values()]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*[t for t in [self._task, *self._starting.values()] if t], return_exceptions=True)

    async def wait(self, instance_id: str, healthy: bool, timeout: float) -> None:
        """Returns once the instance is in the pool (`healthy`) or out of it; TimeoutError after `timeout`."""
        instance = self._registry.get(instance_id)
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: instance.healthy == healthy)

    async def _watch(self) -> None:
        while True:
            await asyncio.gather(*(self._check(i) for i in self._registry.all()))
            await asyncio.sleep(self._interval_s)  # the heartbeat period

    async def _check(self, instance: Instance) -> None:
        if instance.instance_id in self._gone or instance.instance_id in self._starting:
            return
        if not instance.healthy:
            task = asyncio.create_task(self._rejoin(instance))
            self._starting[instance.instance_id] = task
            task.add_done_callback(lambda _: self._starting.pop(instance.instance_id, None))
            return
        try:
            async with asyncio.timeout(self._timeout_s):
                instance.stats = await instance.handle.stats.remote()
        except (RayError, TimeoutError) as e:
            if instance.healthy:
                log.warning("%s missed its heartbeat (%s): out of the pool", instance.instance_id, type(e).__name__)
                await self._set(instance, healthy=False)

    async def _rejoin(self, instance: Instance) -> None:
        try:
            async with asyncio.timeout(self._start_timeout_s):
                info = await instance.handle.start.remote(self._bindings.get(instance.instance_id))
        except ActorDiedError:
            log.error("%s died and will not be restarted: it stays out of the pool", instance.instance_id)
            self._gone.add(instance.instance_id)
            return
        except (RayError, TimeoutError) as e:
            log.warning("%s did not start (%s); trying again", instance.instance_id, type(e).__name__)
            return
        if info.request_address != instance.info.request_address:
            old = instance.channel
            instance.channel = WorkerChannel(info.request_address, self._secret)
            await old.close()
        instance.restarted(info)
        log.info("%s is back in the pool", instance.instance_id)
        await self._set(instance, healthy=True)

    async def _set(self, instance: Instance, healthy: bool) -> None:
        async with self._changed:
            instance.healthy = healthy
            self._changed.notify_all()


def supervise(registry: Registry, secret: str, bindings: dict[str, Binding], **options: Any) -> Supervisor:
    """A running supervisor over `registry` (call from the router's event loop)."""
    supervisor = Supervisor(registry, secret, bindings, **options)
    supervisor.start()
    return supervisor
