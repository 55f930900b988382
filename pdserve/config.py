"""Configuration: one frozen dataclass per component, validated on construction.

`load_config` is the YAML edge: pydantic checks the file's shape (unknown keys are errors), then the
dataclasses below check values. Each component receives its own section, never the root.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, TypeAdapter

from common.roles import Role
from kv_transfer.config import TransferConfig
from router.config import AuthConfig, RouterConfig, SloConfig, TlsConfig
from worker.config import EngineConfig


@dataclass(frozen=True)
class PoolConfig:
    """One pool of instances: how many, what each reserves from Ray, and its engine's own settings.

    `cpus` Ray CPUs per instance (its engine's threads are bound to that many cores of its node), `gpus` GPUs per
    instance, `resources` Ray custom resources per instance (name: amount; a node group that advertises a
    resource takes the pool that asks for it), `engine` fields of the `engine` section this pool sets otherwise
    (a decode pool may want more KV and `max_num_seqs`, a prefill pool a larger `max_num_batched_tokens`).
    """

    instances: int = 1  # engine instances (Ray actors) in the pool
    cpus: int = 1  # Ray CPUs per instance; its engine's threads are bound to that many cores
    gpus: float = 0.0  # GPUs per instance
    resources: dict[str, float] = field(default_factory=dict)  # Ray custom resources per instance, name: amount
    engine: dict[str, Any] = field(default_factory=dict)  # `engine` fields this pool sets otherwise

    def __post_init__(self) -> None:
        if self.instances < 1:
            raise ValueError(f"instances must be >= 1, got {self.instances}")
        if self.cpus < 1:
            raise ValueError(f"cpus must be >= 1, got {self.cpus}")
        if self.gpus < 0 or any(amount <= 0 for amount in self.resources.values()):
            raise ValueError(f"gpus must be >= 0 and every resource amount > 0, got {self.gpus}, {self.resources}")
        unknown = sorted(set(self.engine) - set(EngineConfig.__dataclass_fields__))
        if unknown:
            raise ValueError(f"engine overrides {unknown} are not engine settings; known: "
                             f"{sorted(EngineConfig.__dataclass_fields__)}")

    def engine_config(self, base: EngineConfig) -> EngineConfig:
        """`base` with this pool's overrides (validated as the engine section is)."""
        return dataclasses.replace(base, **self.engine)


@dataclass(frozen=True)
class WorkersConfig:
    """The worker pools. Disaggregated: a `prefill` and a `decode` pool (1P1D, 2P2D, 1P2D, ...); colocated: one
    `colocated` pool of instances that each run whole requests. `bind_threads`: bind each engine's threads to cores
    of its own on its node, and the actors' own threads to the node's cores no engine has (`worker.binding`)."""

    mode: Literal["colocated", "disaggregated"] = "disaggregated"  # prefill and decode pools, or whole requests
    bind_threads: bool = True  # engines on cores of their own, actors on the rest
    channel_port: int = 0  # every worker's request-channel port (0: any free one; fixed: one worker per node)
    prefill: PoolConfig = field(default_factory=PoolConfig)  # disaggregated: runs prompts, sends their KV
    decode: PoolConfig = field(default_factory=PoolConfig)  # disaggregated: receives KV, decodes
    colocated: PoolConfig = field(default_factory=lambda: PoolConfig(instances=2))  # colocated: whole requests

    def __post_init__(self) -> None:
        if self.mode not in ("colocated", "disaggregated"):
            raise ValueError(f"workers.mode must be 'colocated' or 'disaggregated', got {self.mode!r}")
        if not 0 <= self.channel_port <= 65535:
            raise ValueError(f"workers.channel_port must be in [0, 65535], got {self.channel_port}")

    def pools(self) -> list[tuple[Role, PoolConfig]]:
        """The pools this mode runs, prefill before decode."""
        if self.mode == "colocated":
            return [(Role.COLOCATED, self.colocated)]
        return [(Role.PREFILL, self.prefill), (Role.DECODE, self.decode)]

    @property
    def count(self) -> int:
        """How many instances the pools have together."""
        return sum(pool.instances for _, pool in self.pools())

    def layout(self) -> str:
        """"1P1D", "1P2D", "2 colocated"."""
        if self.mode == "colocated":
            return f"{self.colocated.instances} colocated"
        return f"{self.prefill.instances}P{self.decode.instances}D"


@dataclass(frozen=True)
class RayConfig:
    """`address` None starts a local Ray with `num_cpus` CPUs (None: all); "auto" joins a running cluster."""

    address: str | None = None  # null: start a local Ray; "auto" or HOST:PORT: join a running cluster
    num_cpus: int | None = None  # a local Ray's CPUs (null: all)
    namespace: str = "pdserve"  # Ray namespace of the actors
    log_to_driver: bool = True  # workers' logs on the driver's output


@dataclass(frozen=True)
class ServeConfig:
    ray: RayConfig = field(default_factory=RayConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    router: RouterConfig = field(default_factory=RouterConfig)

    def __post_init__(self) -> None:
        for role, pool in self.workers.pools():
            try:
                pool.engine_config(self.engine)
            except ValueError as e:
                raise ValueError(f"workers.{role}.engine: {e}") from None
        if self.workers.mode == "disaggregated":
            for role, pool in self.workers.pools():
                try:
                    self.transfer.check_engine(gpu=pool.gpus >= 1)
                except ValueError as e:
                    raise ValueError(f"workers.{role}: {e}") from None


_STRICT = ConfigDict(extra="forbid")
_SECTIONS = (RayConfig, EngineConfig, PoolConfig, WorkersConfig, TransferConfig, SloConfig, TlsConfig, AuthConfig,
             RouterConfig, ServeConfig)
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
