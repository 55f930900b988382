"""`EngineHost`: what every worker actor does with its engine: start it, report on it, abort, shut down.

`PrefillWorker` (prefill/) and `DecodeWorker` (decode/) add their one request method each. The engine is built
in `start` (tens of seconds), not in the constructor, so the cluster starts every actor's engine at once.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray

from pdserve import channel
from pdserve.affinity import ACTOR_CPUS_ENV, bind_process, parse_cores
from pdserve.config import EngineConfig
from pdserve.engine import Engine, EngineInfo, EngineStats, KVRole
from pdserve.kv_transfer.transport import SECRET_ENV


class EngineHost:
    def __init__(self, instance_id: str, config: EngineConfig, model_dir: str, kv: KVRole | None = None) -> None:
        self.instance_id = instance_id
        self._config = config
        self._model_dir = Path(model_dir)
        self._kv = kv
        self._engine: Engine | None = None
        self._server: Any = None  # the request channel's server (`pdserve.channel`)

    async def start(self) -> EngineInfo:
        """Builds the engine and opens the request channel; called before any request, and again by the
        supervisor after Ray restarted the actor (a no-op on a running one)."""
        if self._engine is None:
            kv = self._kv
            if kv is not None:  # every start is a new incarnation: its KV links fence the older ones out
                kv = dataclasses.replace(kv, extra={**kv.extra, "epoch": time.time_ns() // 1_000_000})
            self._engine = Engine(self._config, self._model_dir, kv)
            await self._engine.start_kv()
            self._server, address = await channel.serve(self, ray.util.get_node_ip_address(), os.environ[SECRET_ENV])
            self._engine.info = dataclasses.replace(self._engine.info, request_address=address)
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

    async def release(self, transfer_ids: Sequence[str]) -> int:
        """Frees KV received for transfers whose decode request will never come."""
        return await self._ready().release(transfer_ids)

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
