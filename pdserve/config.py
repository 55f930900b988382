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

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EngineConfig:
    """One vLLM engine. `model` is a model folder path or the name of a model `pdserve model prepare` makes."""

    model: str = DEFAULT_MODEL
    max_model_len: int = 2048
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    kv_cache_gib: float = 1.0
    dtype: str = "float32"
    block_size: int = 128
    seed: int = 0
    # torch.compile the model. On a 2-core AVX2 machine it did not speed up SmolLM2's decode steps (about
    # 100 ms either way) while a first start compiled for about 4 minutes, so it is off by default.
    compile: bool = False
    log_level: str = "WARNING"  # vLLM's own logging inside the workers

    def __post_init__(self) -> None:
        if self.max_model_len < 16:
            raise ValueError(f"engine.max_model_len must be >= 16, got {self.max_model_len}")
        if self.max_num_seqs < 1:
            raise ValueError(f"engine.max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"engine.max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"engine.max_model_len ({self.max_model_len})"
            )
        if self.kv_cache_gib <= 0:
            raise ValueError(f"engine.kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"engine.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


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
class TransferConfig:
    """How KV moves from prefill to decode workers (disaggregated mode).

    `transport`: "tcp" (loopback on one node, or across nodes) or "shm" (processes of one node). At one layer's
    message size (about 1.5 MB for SmolLM2 at 1,024 tokens) tcp measured faster here than shm, whose ring pays off
    only on bigger messages. `layerwise`: send each layer's KV as
    soon as the prefill computed it (off: after the whole forward; kept to measure what streaming hides).
    `deadline_s`: a transfer not landed by then fails and the decode engine recomputes the prompt.
    `receive_buffer_mib`: per link, KV that arrived before its decode request; the router holds prefills that
    would overflow a decode instance's buffer. `lease_s`: unclaimed received KV is freed after this long.
    `min_prompt_tokens`: shorter prompts skip the transfer and prefill on the decode instance (0: never).
    `fault_every`: for chaos testing only: every n-th transfer of a prefill instance fails on purpose (a dropped
    connection or a stalled peer, alternately); 0 (the default) never.
    """

    transport: Literal["shm", "tcp"] = "tcp"
    tcp_host: str = "127.0.0.1"
    layerwise: bool = True
    deadline_s: float = 30.0
    receive_buffer_mib: int = 512
    lease_s: float = 30.0
    min_prompt_tokens: int = 0
    fault_every: int = 0

    def __post_init__(self) -> None:
        if self.fault_every < 0:
            raise ValueError(f"transfer.fault_every must be >= 0 (0: off), got {self.fault_every}")
        if self.transport not in ("shm", "tcp"):
            raise ValueError(f"transfer.transport must be 'shm' or 'tcp', got {self.transport!r}")
        for name in ("deadline_s", "lease_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"transfer.{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.receive_buffer_mib < 1:
            raise ValueError(f"transfer.receive_buffer_mib must be >= 1, got {self.receive_buffer_mib}")
        if self.min_prompt_tokens < 0:
            raise ValueError(f"transfer.min_prompt_tokens must be >= 0, got {self.min_prompt_tokens}")


@dataclass(frozen=True)
class TlsConfig:
    """TLS on the router's gRPC and HTTP frontends, from PEM files. `cert_file` and `key_file` (the server's
    certificate chain and private key) turn it on; `client_ca_file` makes it mutual: every client must present a
    certificate that this CA signed. Only paths live in the config, never key material."""

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("router.tls.cert_file and router.tls.key_file must be set together")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("router.tls.client_ca_file (mutual TLS) needs router.tls.cert_file and key_file")

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


@dataclass(frozen=True)
class AuthConfig:
    """Bearer-token authentication on both frontends. The token is read at start from the environment variable
    named by `token_env` or from the file `token_file`, never from the config itself; neither set: no
    authentication."""

    token_env: str | None = None
    token_file: str | None = None

    def __post_init__(self) -> None:
        if self.token_env is not None and self.token_file is not None:
            raise ValueError("router.auth: set token_env or token_file, not both")
        if self.token_env == "":
            raise ValueError("router.auth.token_env must name an environment variable")

    @property
    def enabled(self) -> bool:
        return self.token_env is not None or self.token_file is not None


@dataclass(frozen=True)
class RouterConfig:
    """The router and its frontends: gRPC on `port`, the OpenAI-compatible HTTP API on `http_port`, Prometheus
    metrics on `metrics_port`, all on `host`; a port of 0 picks a free one."""

    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int = 8000  # OpenAI-compatible HTTP: /v1/completions, /v1/chat/completions, /v1/models, /health
    metrics_port: int = 9400  # Prometheus /metrics over HTTP
    policy: str = "least_outstanding"  # places whole requests (colocated) and decodes (disaggregated)
    prefill_policy: str = "least_outstanding"  # places prefills (disaggregated)
    # A head file from `pdserve predictor train`: each request's output length is predicted from its prompt, for
    # length-aware policies and the prediction-error metrics. None: every request is taken to run to max_tokens.
    predictor: str | None = None
    # Requests a length-aware policy finds no KV room for wait for a request to end, up to this many at once.
    hold_queue: int = 256
    max_tokens_limit: int = 1024
    default_max_tokens: int = 128
    # Admission: at most `max_outstanding` requests run at once (0: no limit), `admission_queue` more wait for a
    # slot; one more is refused (RESOURCE_EXHAUSTED / 429) with a retry hint of about `retry_after_s`.
    max_outstanding: int = 0
    admission_queue: int = 1024
    retry_after_s: float = 1.0
    tls: TlsConfig = field(default_factory=TlsConfig)  # off unless cert_file and key_file are set
    auth: AuthConfig = field(default_factory=AuthConfig)  # off unless token_env or token_file is set

    def __post_init__(self) -> None:
        for name in ("port", "http_port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"router.{name} must be in [0, 65535], got {getattr(self, name)}")
        for name in ("max_outstanding", "admission_queue", "hold_queue"):
            if getattr(self, name) < 0:
                raise ValueError(f"router.{name} must be >= 0, got {getattr(self, name)}")
        if not self.retry_after_s > 0:
            raise ValueError(f"router.retry_after_s must be > 0 seconds, got {self.retry_after_s}")
        if self.max_tokens_limit < 1:
            raise ValueError(f"router.max_tokens_limit must be >= 1, got {self.max_tokens_limit}")
        from pdserve.router.policy import POLICIES, PREFILL_POLICIES

        if self.policy not in POLICIES:
            raise ValueError(f"router.policy must be one of {sorted(POLICIES)}, got {self.policy!r}")
        if self.prefill_policy not in PREFILL_POLICIES:
            raise ValueError(f"router.prefill_policy must be one of {sorted(PREFILL_POLICIES)}, got "
                             f"{self.prefill_policy!r}")
        if self.predictor is not None and not Path(self.predictor).is_file():
            raise ValueError(f"router.predictor: no head file at {self.predictor!r}; train one with "
                             "`pdserve predictor train`, or leave it null")


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
