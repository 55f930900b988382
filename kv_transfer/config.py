"""`TransferConfig`: how KV moves from prefill to decode workers; the one source of the connector's settings.

The cluster hands it, field by field, to each disaggregated engine's connector (`kv_connector_extra_config`), which
rebuilds it with `ConnectorSettings.from_extra`: an unknown or misspelt key there is an error, never silently dropped.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class TransferConfig:
    """How KV moves from prefill to decode workers (disaggregated mode).

    `transport`: "auto" (shared memory between two workers of one node, tcp between nodes, chosen per pair by the
    prefill), "tcp" (loopback on one node, or across nodes), "shm" (processes of one node only) or "nccl" (GPU
    engines only: each layer's KV from GPU to GPU through NCCL, one communicator per prefill/decode pair, with a
    tcp link beside it for control; a pair on one GPU is refused and recomputes). At one layer's
    message size (about 1.5 MB for SmolLM2 at 1,024 tokens) tcp measured faster here than shm, whose ring pays off
    only on bigger messages.
    `bind_host`: where a decode worker's tcp listener binds on its node: an address ("0.0.0.0", all interfaces,
    by default) or a CIDR (the node's own address inside it, e.g. the KV network's "10.0.0.0/16").
    `advertise_cidr`: the tcp address a decode worker tells prefill workers to dial is its node's own address
    inside this CIDR; None: the bound address when `bind_host` names one, else the node address Ray reports.
    `kv_port`: the decode workers' tcp port (0: a free one each; a fixed one, for a firewall or a NetworkPolicy to
    open, allows one decode worker per node).
    `layerwise`: send each layer's KV as soon as the prefill computed it (off: after the whole forward; kept to
    measure what streaming hides).
    `deadline_s`: a transfer not landed by then fails and the decode engine recomputes the prompt.
    `receive_buffer_mib`: per link, KV that arrived before its decode request; the router holds prefills that
    would overflow a decode instance's buffer. `lease_s`: unclaimed received KV is freed after this long.
    `min_prompt_tokens`: shorter prompts skip the transfer and prefill on the decode instance (0: never).
    `fault_every`: for chaos testing only: every n-th transfer of a prefill instance fails on purpose (a dropped
    connection or a stalled peer, alternately); 0 (the default) never.
    """

    transport: Literal["auto", "shm", "tcp", "nccl"] = "auto"
    bind_host: str = "0.0.0.0"
    advertise_cidr: str | None = None
    kv_port: int = 0
    layerwise: bool = True
    deadline_s: float = 30.0
    receive_buffer_mib: int = 512
    lease_s: float = 30.0
    min_prompt_tokens: int = 0
    fault_every: int = 0
    connect_timeout_s: float = 5.0  # a prefill gives up dialing its decode peer after this long (and recomputes)
    stall_timeout_s: float = 10.0  # a link that moves no byte for this long is broken

    def __post_init__(self) -> None:
        if self.fault_every < 0:
            raise ValueError(f"transfer.fault_every must be >= 0 (0: off), got {self.fault_every}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transfer.transport must be one of {_quoted(TRANSPORTS)}, got {self.transport!r}")
        try:
            ipaddress.ip_network(self.bind_host, strict=False)
        except ValueError:
            raise ValueError(f"transfer.bind_host must be an IP address or a CIDR, got {self.bind_host!r}") from None
        if not 0 <= self.kv_port <= 65535:
            raise ValueError(f"transfer.kv_port must be a tcp port, 0 to 65535 (0: any free one), got {self.kv_port}")
        if self.advertise_cidr is not None:
            try:
                ipaddress.ip_network(self.advertise_cidr, strict=False)
            except ValueError:
                raise ValueError(f"transfer.advertise_cidr must be a CIDR such as 10.0.0.0/16, got "
                                 f"{self.advertise_cidr!r}") from None
        for name in ("deadline_s", "lease_s", "connect_timeout_s", "stall_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"transfer.{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.receive_buffer_mib < 1:
            raise ValueError(f"transfer.receive_buffer_mib must be >= 1, got {self.receive_buffer_mib}")
        if self.min_prompt_tokens < 0:
            raise ValueError(f"transfer.min_prompt_tokens must be >= 0, got {self.min_prompt_tokens}")


    def check_engine(self, gpu: bool) -> None:
        """Refuse a transport the engine cannot run: "nccl" on an engine without a GPU."""
        if self.transport in GPU_TRANSPORTS and not gpu:
            raise ValueError(
                f"transfer.transport: {self.transport!r} needs GPU engines (workers' gpus >= 1, vLLM for CUDA); "
                f"this engine has no GPU: use one of {_quoted(CPU_TRANSPORTS)}"
            )


TRANSPORTS = ("auto", "shm", "tcp", "nccl")
GPU_TRANSPORTS = ("nccl",)
CPU_TRANSPORTS = tuple(t for t in TRANSPORTS if t not in GPU_TRANSPORTS)


def _quoted(names: tuple[str, ...]) -> str:
    return ", ".join(repr(n) for n in names)


@dataclass(frozen=True, slots=True)
class ConnectorSettings:
    """What one engine's connector is told (`kv_connector_extra_config`): which incarnation of which instance it
    serves, where (`node_id`, `node_ip`: the Ray node the actor runs on, stamped by the actor at start, as the
    epoch is), and the deployment's `TransferConfig`."""

    instance_id: str
    epoch: int
    transfer: TransferConfig
    node_id: str = ""
    node_ip: str = ""

    def to_extra(self) -> dict[str, Any]:
        return {"instance_id": self.instance_id, "epoch": self.epoch, "node_id": self.node_id,
                "node_ip": self.node_ip, "transfer": asdict(self.transfer)}

    @staticmethod
    def from_extra(extra: dict[str, Any]) -> ConnectorSettings:
        """Reads `to_extra`'s mapping back; a missing or unknown key raises ValueError naming it."""
        unknown = sorted(set(extra) - {"instance_id", "epoch", "node_id", "node_ip", "transfer"})
        if unknown:
            raise ValueError(f"unknown KV connector settings {unknown}")
        try:
            transfer = from_extra(dict(extra["transfer"]))
            return ConnectorSettings(str(extra["instance_id"]), int(extra["epoch"]), transfer,
                                     str(extra["node_id"]), str(extra["node_ip"]))
        except KeyError as e:
            raise ValueError(f"the KV connector settings lack {e.args[0]!r}") from None


def from_extra(values: dict[str, Any]) -> TransferConfig:
    """The config back from its fields' values; an unknown key raises ValueError naming it."""
    unknown = sorted(set(values) - set(TransferConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown transfer settings {unknown}; known: {sorted(TransferConfig.__dataclass_fields__)}")
    return TransferConfig(**values)
