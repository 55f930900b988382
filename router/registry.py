"""The instance registry: the router's live view of its workers (handles, channels, outstanding requests).

Policies never see this object, only the `InstanceSnapshot`s it hands out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdserve.engine import EngineInfo, EngineStats
from pdserve.router.instance import InstanceSnapshot


@dataclass(slots=True)
class Instance:
    instance_id: str
    role: str
    handle: Any  # the worker's Ray actor handle: lifecycle calls (stats, abort, release, shutdown)
    info: EngineInfo
    channel: Any  # the worker's request channel (`pdserve.channel.WorkerChannel`): prompts in, tokens out
    outstanding: int = 0
    healthy: bool = True
    draining: bool = False  # out of placement; it finishes the requests it has
    stats: EngineStats | None = None  # the engine's stats at its last heartbeat; None: none yet

    def snapshot(self) -> InstanceSnapshot:
        return InstanceSnapshot(self.instance_id, self.role, self.outstanding, self.healthy, draining=self.draining)


class Registry:
    def __init__(self, instances: list[Instance]) -> None:
        if not instances:
            raise ValueError("a registry needs at least one instance")
        self._by_id = {i.instance_id: i for i in instances}

    def snapshots(self, role: str) -> list[InstanceSnapshot]:
        return [i.snapshot() for i in self._by_id.values() if i.role == role]

    def get(self, instance_id: str) -> Instance:
        return self._by_id[instance_id]

    def all(self) -> list[Instance]:
        return list(self._by_id.values())

    def remove(self, instance_id: str) -> Instance:
        """Takes the instance out of the registry (the router and the supervisor forget it)."""
        if len(self._by_id) == 1:
            raise ValueError(f"{instance_id} is the last instance; a registry needs at least one")
        return self._by_id.pop(instance_id)

    def count(self, role: str) -> int:
        return sum(1 for i in self._by_id.values() if i.role == role)
