"""Frontend security: TLS (optionally mutual) and bearer-token authentication, for the gRPC and HTTP frontends.

`load_security` reads, once at start, what the config points to: the PEM files of `router.tls` and the token of
`router.auth` (from the environment variable it names, or from a file). Secrets never sit in the config.

Authentication: a call carries `authorization: Bearer <token>` (gRPC metadata, or the HTTP header).
`check_bearer` compares in constant time and returns why a call is refused, or None. On gRPC, `TokenInterceptor`
refuses every call without the token with UNAUTHENTICATED, except standard health checking (`grpc.health.v1`),
which probes reach without one. The HTTP frontend answers 401 with OpenAI's error body and `WWW-Authenticate`,
except on `/health`.

TLS: `server_credentials` are gRPC's; the HTTP frontend hands the same files to uvicorn. With a client CA both
require a client certificate that the CA signed (mutual TLS).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from router.config import AuthConfig, TlsConfig

AUTHORIZATION = "authorization"
SCHEME = "Bearer"
OPEN_METHODS_PREFIX = "/grpc.health.v1.Health/"  # probes reach health checking without a token


@dataclass(frozen=True)
class Security:
    """What the frontends enforce: `tls` (paths; off unless `tls.enabled`) and the bearer `token` (None: none)."""

    tls: TlsConfig = field(default_factory=TlsConfig)
    token: str | None = field(default=None, repr=False)  # never in a repr: logs and tracebacks print those

    def __repr__(self) -> str:
        token = "None" if self.token is None else "<redacted>"
        return f"Security(tls={self.tls!r}, token={token})"


def load_security(tls: TlsConfig, auth: AuthConfig, environ: Mapping[str, str] = os.environ) -> Security:
    """Reads the token and checks that the TLS files are readable; ValueError names what is missing."""
    for name in ("cert_file", "key_file", "client_ca_file"):
        path = getattr(tls, name)
        if path is not None:
            _read(f"router.tls.{name}", path)
    token = None
    if auth.token_env is not None:
        token = environ.get(auth.token_env, "").strip()
        where = f"the environment variable {auth.token_env} (router.auth.token_env)"
    elif auth.token_file is not None:
        token = _read("router.auth.token_file", auth.token_file).decode("utf-8", "replace").strip()
        where = f"the file {auth.token_file} (router.auth.token_file)"
    if token is not None:
        if not token:
            raise ValueError(f"the API token is empty: set {where}")
        if not all(33 <= ord(c) <= 126 for c in token):
            raise ValueError(f"the API token in {where} must be printable ASCII without spaces")
    return Security(tls, token)


def _read(field: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{field}: cannot read {path}: {e.strerror}") from None


def check_bearer(header: str | None, token: str) -> str | None:
    """None when `header` (the authorization value) carries `token`; else the refusal's message."""
    if not header:
        return f"missing credentials: send the header 'authorization: {SCHEME} <token>'"
    scheme, _, presented = header.strip().partition(" ")
    if scheme.lower() != SCHEME.lower() or not presented.strip():
        return f"malformed authorization: expected '{SCHEME} <token>'"
    if not hmac.compare_digest(presented.strip().encode(), token.encode()):
        return "invalid API token"
    return None


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    """gRPC's TLS credentials for the frontend; None when TLS is off."""
    if tls.cert_file is None or tls.key_file is None:
        return None
    key, chain = Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes()
    client_ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def interceptors(security: Security) -> list[grpc.aio.ServerInterceptor]:
    return [TokenInterceptor(security.token)] if security.token is not None else []


class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls without the bearer token (UNAUTHENTICATED), except health checking."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS_PREFIX):
            return handler
        header = next((v for k, v in details.invocation_metadata or () if k == AUTHORIZATION), None)
        refusal = check_bearer(header if isinstance(header, str) else None, self._token)
        return handler if refusal is None else _refusing(handler, refusal)


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that ends the call with UNAUTHENTICATED before reading the request."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
