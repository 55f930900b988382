"""Python client for pdserve: stream generations over gRPC. Needs only grpcio and protobuf."""

from pdserve_client._wire import Sampling
from pdserve_client.client import AsyncClient, AsyncStream, Client, Stream
from pdserve_client.errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PdserveError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from pdserve_client.retry import Retry
from pdserve_client.tls import Tls
from pdserve_client.types import Chunk, Completion, Final, PhaseTimings, ServerInfo

__all__ = [
    "AsyncClient",
    "AsyncStream",
    "Cancelled",
    "Chunk",
    "Client",
    "Completion",
    "DeadlineExceeded",
    "Final",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PdserveError",
    "PhaseTimings",
    "ResourceExhausted",
    "Retry",
    "Sampling",
    "ServerInfo",
    "Stream",
    "Tls",
    "Unauthenticated",
    "Unavailable",
]
