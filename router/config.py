"""The router's configuration: `RouterConfig` with its `SloConfig` and its frontends' `TlsConfig` and
`AuthConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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
class SloConfig:
    """Service-level objectives per request: time to first token (`ttft_s`) and time per output token after the
    first (`tpot_ms`). `split_policy: sooner` keeps the TPOT of the requests decoding on an instance within
    `tpot_ms`; `router.shed` refuses a request projected to miss `ttft_s`. None: unchecked."""

    ttft_s: float | None = None  # time to first token; what router.shed keeps
    tpot_ms: float | None = None  # time per output token after the first; what split_policy "sooner" keeps

    def __post_init__(self) -> None:
        for name, unit in (("ttft_s", "s"), ("tpot_ms", "ms")):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"router.slo.{name} must be > 0 {unit} (or null: unchecked), got {value}")


@dataclass(frozen=True)
class RouterConfig:
    """The router and its frontends: gRPC on `port` and the OpenAI-compatible HTTP API on `http_port`, both on
    `host`; Prometheus metrics on `metrics_port` of `metrics_host`, unauthenticated, so local by default. A port of
    0 picks a free one.

    Connection limits: a client must send a whole HTTP request head, or finish gRPC's handshake (TLS and HTTP/2),
    within `header_timeout_s` of connecting (a later request on a kept-alive HTTP connection: of its first byte),
    else its connection is closed."""

    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int = 8000  # OpenAI-compatible HTTP: /v1/completions, /v1/chat/completions, /v1/models, /health
    metrics_host: str = "127.0.0.1"  # where /metrics listens; 0.0.0.0 only where a firewall admits just Prometheus
    metrics_port: int = 9400  # Prometheus /metrics over HTTP
    policy: str = "least_outstanding"  # places whole requests (colocated) and decodes (disaggregated)
    prefill_policy: str = "least_outstanding"  # places prefills (disaggregated)
    # Disaggregated: "always" prefills every prompt of transfer.min_prompt_tokens or more on a prefill instance;
    # "sooner" runs a request whole on its decode instance when that instance has fewer prompt tokens queued than
    # every prefill instance, keeping the TPOT of the requests decoding there within slo.tpot_ms.
    split_policy: str = "always"  # disaggregated: "always" or "sooner" (whole on the decode instance when sooner)
    slo: SloConfig = field(default_factory=SloConfig)  # the objectives per request; unchecked unless set
    # Shedding: a request whose first token is projected (queued prompt tokens at the measured prefill pace) to come
    # later than slo.ttft_s is refused before it runs (RESOURCE_EXHAUSTED / 429, retry hint: the projected excess).
    shed: bool = False  # refuse requests projected to miss slo.ttft_s (needs it)
    # A head file from `pdserve predictor train`: each request's output length is predicted from its prompt, for
    # length-aware policies and the prediction-error metrics. None: every request is taken to run to max_tokens.
    predictor: str | None = None
    # Requests a length-aware policy finds no KV room for wait for a request to end, up to this many at once.
    hold_queue: int = 256
    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 128  # a request's max_tokens when it names none
    max_prompt_bytes: int = 4 << 20  # a prompt's text (all chat messages together) over this is refused at once
    max_body_bytes: int = 8 << 20  # an HTTP body over this gets 413 before it is read
    # Admission: at most `max_outstanding` requests run at once (0: no limit), `admission_queue` more wait for a
    # slot; one more is refused (RESOURCE_EXHAUSTED / 429) with a retry hint of about `retry_after_s`.
    max_outstanding: int = 0
    admission_queue: int = 1024
    retry_after_s: float = 1.0
    header_timeout_s: float = 10.0  # see above: the time to send an HTTP request head or finish gRPC's handshake
    body_timeout_s: float = 30.0  # an HTTP body not in whole this long after its head gets 408
    max_http_connections: int = 1024  # HTTP connections served at once; a request on one more gets 503
    max_grpc_connections: int = 1024  # gRPC connections at once; one more is closed at once (UNAVAILABLE)
    max_grpc_streams: int = 1024  # Generate calls at once, all connections together; one more: RESOURCE_EXHAUSTED
    max_streams_per_connection: int = 100  # gRPC calls at once on one connection (HTTP/2); a client queues more
    grpc_idle_timeout_s: float = 300.0  # a gRPC connection without a call for this long is closed (0: never)
    grpc_max_connection_age_s: float = 0.0  # a gRPC connection this old takes no new call; its calls finish (0: never)
    tls: TlsConfig = field(default_factory=TlsConfig)  # off unless cert_file and key_file are set
    auth: AuthConfig = field(default_factory=AuthConfig)  # off unless token_env or token_file is set

    def __post_init__(self) -> None:
        for name in ("port", "http_port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"router.{name} must be in [0, 65535], got {getattr(self, name)}")
        for name in ("max_prompt_bytes", "max_body_bytes", "max_http_connections", "max_grpc_connections",
                     "max_grpc_streams", "max_streams_per_connection"):
            if getattr(self, name) < 1:
                raise ValueError(f"router.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_outstanding", "admission_queue", "hold_queue"):
            if getattr(self, name) < 0:
                raise ValueError(f"router.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"router.{name} must be > 0 seconds, got {getattr(self, name)}")
        for name in ("grpc_idle_timeout_s", "grpc_max_connection_age_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"router.{name} must be >= 0 seconds (0: no limit), got {getattr(self, name)}")
        if not self.retry_after_s > 0:
            raise ValueError(f"router.retry_after_s must be > 0 seconds, got {self.retry_after_s}")
        if self.max_tokens_limit < 1:
            raise ValueError(f"router.max_tokens_limit must be >= 1, got {self.max_tokens_limit}")
        from common.roles import Role
        from router.placement.registry import policy_names

        if self.policy not in (decode := policy_names(Role.DECODE)):
            raise ValueError(f"router.policy must be one of {decode}, got {self.policy!r}")
        if self.prefill_policy not in (prefill := policy_names(Role.PREFILL)):
            raise ValueError(f"router.prefill_policy must be one of {prefill}, got {self.prefill_policy!r}")
        from router.placement.split import SPLIT_POLICIES

        if self.split_policy not in SPLIT_POLICIES:
            raise ValueError(f"router.split_policy must be one of {list(SPLIT_POLICIES)}, got {self.split_policy!r}")
        if self.shed and self.slo.ttft_s is None:
            raise ValueError("router.shed refuses requests projected to miss router.slo.ttft_s: set slo.ttft_s too")
        if self.predictor is not None and not Path(self.predictor).is_file():
            raise ValueError(f"router.predictor: no head file at {self.predictor!r}; train one with "
                             "`pdserve predictor train`, or leave it null")
