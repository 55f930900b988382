"""Typed errors of the serving path.

Each error names the gRPC status it maps to; the gRPC edge translates it once. Messages are written for the
user: they name the field and what would be accepted.
"""

from __future__ import annotations

from typing import ClassVar


class ServeError(Exception):
    """Base of every error pdserve reports to a client; `status` is a gRPC status code name."""

    status: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServeError):
    status = "INVALID_ARGUMENT"


class ModelNotFound(ServeError):
    status = "NOT_FOUND"


class NoInstance(ServeError):
    """No healthy instance can take the request right now."""

    status = "UNAVAILABLE"


class DeadlineExceeded(ServeError):
    status = "DEADLINE_EXCEEDED"


class EngineFailure(ServeError):
    """The engine failed while running the request."""

    status = "INTERNAL"


class Overloaded(ServeError):
    """No instance can take the request's projected load now; `retry_after_s` says when trying again may work."""

    status = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
