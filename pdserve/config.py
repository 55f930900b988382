"""Configuration: one frozen dataclass per component, validated on construction.

`load_config` is the YAML edge: pydantic checks the file's shape (unknown keys are errors), then the
dataclasses below check values. Each component receives its own section, never the root.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import ConfigDict, TypeAdapter

from kv_transfer.config import TransferConfig
from router.config import AuthConfig, RouterConfig, TlsConfig
from worker.config import EngineConfig


@dataclass(frozen=True)
class WorkersConfig:
    """The pool of instances and how they share the node's cores.

    Each instance is a Ray actor reserving `cpus_per_instance` CPUs; its engine's OpenMP threads are bound to
    its own cores (instance i gets cores [i*c, (i+1)*c) modulo the node's cores), so instances never
    oversubscribe a core. The actors' own threads (request channel, engine client) are bound to the cores no
    engine has, when there are any, so that they never take an engine's core between its steps.
    """

    mode: Literal["colocated", "disaggregated"] = "disaggregated"
    instances: int = 2  # colocated mode: instances that each run whole requests
    prefill_instances: int = 1  # disaggregated mode: the pools (1P1D, 2P2D, 1P2D, ...)
    decode_instances: int = 1
    cpus_per_instance: int = 1
    bind_threads: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("colocated", "disaggregated"):
            raise ValueError(f"workers.mode must be 'colocated' or 'disaggregated', got {self.mode!r}")
        for name in ("instances", "prefill_instances", "decode_instances"):
            if getattr(self, name) < 1:
                raise ValueError(f"workers.{name} must be >= 1, got {getattr(self, name)}")
        if self.cpus_per_instance < 1:
            raise ValueError(f"workers.cpus_per_instance must be >= 1, got {self.cpus_per_instance}")

    @property
    def count(self) -> int:
        """How many instances the pool has, in either mode."""
        return self.instances if self.mode == "colocated" else self.prefill_instances + self.decode_instances

    def engine_cores(self, index: int, node_cpus: int) -> list[int]:
        """The cores instance `index`'s engine threads are bound to on a node of `node_cpus` cores."""
        c = self.cpus_per_instance
        return sorted({(index * c + k) % node_cpus for k in range(c)})

    def spare_cores(self, node_cpus: int) -> list[int]:
        """The node's cores no engine is bound to (none when binding is off: then nothing is bound)."""
        if not self.bind_threads:
            return []
        taken = {core for i in range(self.count) for core in self.engine_cores(i, node_cpus)}
        return [core for core in range(node_cpus) if core not in taken]


@dataclass(frozen=True)
class RayConfig:
    """`address` None starts a local Ray with `num_cpus` CPUs (None: all); "auto" joins a running cluster."""

    address: str | None = None
    num_cpus: int | None = None
    namespace: str = "pdserve"
    log_to_driver: bool = True


@dataclass(frozen=True)
class ServeConfig:
    ray: RayConfig = field(default_factory=RayConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    router: RouterConfig = field(default_factory=RouterConfig)


_STRICT = ConfigDict(extra="forbid")
_SECTIONS = (RayConfig, EngineConfig, WorkersConfig, TransferConfig, TlsConfig, AuthConfig, RouterConfig, ServeConfig)
for _section in _SECTIONS:
    _section.__pydantic_config__ = _STRICT  # type: ignore[attr-defined,union-attr]
_ADAPTER = TypeAdapter(ServeConfig)


def config_from_dict(data: dict[str, object]) -> ServeConfig:
    """Validates a parsed YAML mapping: unknown keys and bad values raise pydantic.ValidationError."""
    return _ADAPTER.validate_python(data)


def load_config(path: str | Path | None = None) -> ServeConfig:
    """Reads a YAML file; None reads the embedded default (local Ray, CPU, SmolLM2)."""
    if path is None:
        text = resources.files("pdserve").joinpath("default.yaml").read_text()
    else:
        text = Path(path).read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'default.yaml'}: the top level must be a mapping of sections")
    return config_from_dict(data)
