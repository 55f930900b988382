"""Typed errors raised by the client: one class per gRPC status code the server uses.

Every error carries the gRPC status `code` and the server's `message`, which names the offending field and the
accepted range where the request was at fault; `retry_after_s` is the server's hint of when trying again may
work (sent with RESOURCE_EXHAUSTED), or None.
"""

from __future__ import annotations

import grpc

from pdserve_client.retry import retry_after_s


class PdserveError(Exception):
    """A call to pdserve failed; `code` is the gRPC status, `message` the server's explanation."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(PdserveError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class OutOfRange(PdserveError):
    code = grpc.StatusCode.OUT_OF_RANGE


class NotFound(PdserveError):
    code = grpc.StatusCode.NOT_FOUND


class DeadlineExceeded(PdserveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(PdserveError):
    code = grpc.StatusCode.CANCELLED


class ResourceExhausted(PdserveError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(PdserveError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(PdserveError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Internal(PdserveError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[PdserveError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        OutOfRange,
        NotFound,
        DeadlineExceeded,
        Cancelled,
        ResourceExhausted,
        Unavailable,
        Unauthenticated,
        Internal,
    )
}


def from_rpc_error(error: grpc.RpcError) -> PdserveError:
    """Turns a gRPC error (sync or asyncio) into the matching typed error."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
    details = error.details() if hasattr(error, "details") else str(error)  # type: ignore[attr-defined]
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None  # type: ignore[attr-defined]
    cls = _BY_CODE.get(code, PdserveError)
    return cls(details or code.name, code, retry_after_s(trailing))
