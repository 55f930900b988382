"""`EngineHost`: what every worker actor does with its engine: start it, open its request channel, report on it,
abort, shut down.

`PrefillWorker` (prefill/) and `DecodeWorker` (decode/) build on it: each names the request-channel methods it
serves (`handlers`) and may finish its own start (`_started`). The engine is built in `start` (tens of seconds),
not in the constructor, so the cluster starts every actor's engine at once.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import ray

from common.results import EngineInfo, EngineStats
from kv_transfer.transport import SECRET_ENV
from worker.affinity import ACTOR_CPUS_ENV, bind_process, parse_cores
from worker.channel_server import ChannelServer, Handler, serve
from worker.config import EngineConfig
from worker.engine import Engine, KVRole


class EngineHost:
    def __init__(self, instance_id: str, config: EngineConfig, model_dir: str, kv: KVRole | None = None) -> None:
        self.instance_id = instance_id
        self._config = config
        self._model_dir = Path(model_dir)
        self._kv = kv
        self._engine: Engine | None = None
        self._server: ChannelServer | None = None

    def handlers(self) -> dict[str, Handler]:
        """The request-channel methods this worker serves, by name."""
        raise NotImplementedError

    async def _started(self, engine: Engine) -> None:
        """The role's own start, once the engine runs (a decode worker learns its KV receive address)."""

    async def start(self) -> EngineInfo:
        """Builds the engine and opens the request channel; called before any request, and again by the
        supervisor after Ray restarted the actor (a no-op on a running one)."""
        if self._engine is None:
            kv = self._kv
            if kv is not None:  # every start is a new incarnation: its KV links fence the older ones out
                epoch = time.time_ns() // 1_000_000
                kv = dataclasses.replace(kv, settings=dataclasses.replace(kv.settings, epoch=epoch))
            engine = Engine(self._config, self._model_dir, kv)
            await self._started(engine)
            self._server, address = await serve(self.handlers(), ray.util.get_node_ip_address(),
                                                os.environ[SECRET_ENV])
            engine.info = dataclasses.replace(engine.info, request_address=address)
            self._engine = engine
            # Bound only now: the engine's processes, started above, must not inherit these cores.
            if os.environ.get(ACTOR_CPUS_ENV):
                bind_process(parse_cores(os.environ[ACTOR_CPUS_ENV]))
        return self._engine.info

    def _ready(self) -> Engine:
        if self._engine is None:
            raise RuntimeError(f"{self.instance_id}: start() was not called")
        return self._engine

    async def abort(self, request_id: str) -> None:
        await self._ready().abort(request_id)

    async def stats(self) -> EngineStats:
        return self._ready().stats()

    async def wait_idle(self, timeout: float) -> EngineStats:
        return await self._ready().wait_idle(timeout)

    async def kv_state(self) -> dict[str, int]:
        """Our KV connector's state in the engine: transfers in progress, bytes held in receive buffers."""
        return await self._ready().kv_state()

    async def transfer_record(self, kind: str, transfer_id: str, timeout: float) -> dict[str, object]:
        """The connector's record of one finished transfer: "sent" (prefill) or "recv" (decode)."""
        return await self._ready().wait_transfer_record(kind, transfer_id, timeout)

    async def pid(self) -> int:
        return os.getpid()

    async def shutdown(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
