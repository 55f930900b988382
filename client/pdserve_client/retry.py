"""When the client tries a call again, and how long it waits first. Pure: no I/O, no clock.

A call is tried again only where that is safe: `GetServerInfo` and `ListModels` always; `Generate` before its
first chunk (the server has sent nothing), and after it by resuming (the resent request carries the tokens
already received, so the server continues after them). Only UNAVAILABLE (the server or the connection went
away) is retried by default; RESOURCE_EXHAUSTED (overload) only with `resource_exhausted=True`, after the
server's hint (`pdserve-retry-after-ms`) when it sends one.

Waits grow exponentially with "full jitter" (uniformly drawn between 0 and the capped exponential), so clients
that failed together do not come back together. `max_attempts` counts the attempts of one call, the first
included, and restarts whenever a stream makes progress (a chunk arrives).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

RETRY_AFTER_METADATA = "pdserve-retry-after-ms"


@dataclass(frozen=True)
class Retry:
    """How the client retries; `Retry(max_attempts=1)` turns retries off."""

    max_attempts: int = 3
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    resource_exhausted: bool = False  # also retry overload refusals (RESOURCE_EXHAUSTED)
    resume: bool = True  # resume a generation whose stream broke after its first chunk

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0 <= self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("backoffs must satisfy 0 <= initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")

    def retries(self, code: grpc.StatusCode) -> bool:
        return code == grpc.StatusCode.UNAVAILABLE or (
            self.resource_exhausted and code == grpc.StatusCode.RESOURCE_EXHAUSTED
        )

    def backoff(self, failures: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(max, initial * multiplier^(failures-1))]."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** max(0, failures - 1))
        return rng.uniform(0.0, cap)

    def delay(self, code: grpc.StatusCode, failures: int, hint_s: float | None, rng: random.Random) -> float | None:
        """Seconds to wait before the next attempt after `failures` failed attempts in a row, the last one with
        `code` and the server's retry hint `hint_s`; None: give up and report the failure."""
        if failures >= self.max_attempts or not self.retries(code):
            return None
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and hint_s is not None:
            # At least what the server asked for, plus a little jitter so refused clients spread out.
            return hint_s + rng.uniform(0.0, min(hint_s, self.max_backoff_s) * 0.1)
        return self.backoff(failures, rng)


def retry_after_s(trailing_metadata: object) -> float | None:
    """The server's retry hint in seconds, from a failed call's trailing metadata; None when absent or garbled."""
    for key, value in trailing_metadata or ():  # type: ignore[attr-defined]
        if key == RETRY_AFTER_METADATA:
            try:
                ms = int(value)
            except (TypeError, ValueError):
                return None
            return ms / 1000 if ms >= 0 else None
    return None
