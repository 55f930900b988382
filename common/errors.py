"""Typed errors of the serving path.

Each error names the gRPC status it maps to; the gRPC edge translates it once. Messages are written for the
user: they name the field and what would be accepted. `Overloaded` carries a retry hint, which travels as the
trailing metadata `pdserve-retry-after-ms` (gRPC) or the `Retry-After` header (HTTP).
"""

from __future__ import annotations

import math
from typing import ClassVar

RETRY_AFTER_METADATA = "pdserve-retry-after-ms"  # gRPC trailing metadata of a RESOURCE_EXHAUSTED reply


class ServeError(Exception):
    """Base of every error pdserve reports to a client; `status` is a gRPC status code name."""

    status: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServeError):
    status = "INVALID_ARGUMENT"


class AlreadyExists(ServeError):
    """A request under the key of one still running, that is not resuming it."""

    status = "ALREADY_EXISTS"


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


def retry_after_ms(e: Overloaded) -> str:
    """The gRPC retry hint: whole milliseconds, rounded up, as the trailing metadata's string value."""
    return str(max(0, math.ceil(e.retry_after_s * 1000)))


def retry_after_header(e: Overloaded) -> str:
    """HTTP's Retry-After: whole seconds, rounded up (the header takes no fraction)."""
    return str(max(0, math.ceil(e.retry_after_s)))


def trailing_metadata(e: ServeError) -> tuple[tuple[str, str], ...]:
    """What a gRPC reply carries beside the status: the retry hint of an `Overloaded`, else nothing."""
    return ((RETRY_AFTER_METADATA, retry_after_ms(e)),) if isinstance(e, Overloaded) else ()
