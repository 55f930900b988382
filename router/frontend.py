"""What every frontend (gRPC, HTTP) does alike once its wire format is parsed.

- `deadline_after`: the client's timeout, seconds from now, becomes the request's deadline on the monotonic
  clock the router uses.
- `open_stream`: the router's deltas for one request, as an async context manager. Leaving it before the last
  delta (the client went away, the response failed) closes the router's generator there and then, which stops
  the request in the engines at once rather than whenever the garbage collector finds the suspended generator.
- `LiveStreams`: the streams running under each client key (`GenerateRequest.request_id`). A request that comes
  with the key of one still running supersedes it (a client resends under the same key only when it lost the
  first stream, to resume it), so one key never runs twice.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass

from router.request import Request
from router.service import Delta, Router


def deadline_after(timeout_s: float | None) -> float | None:
    """`time.monotonic()` after which the request is abandoned; None (no timeout) means never."""
    return None if timeout_s is None else time.monotonic() + timeout_s


def open_stream(router: Router, request: Request) -> contextlib.aclosing[AsyncGenerator[Delta, None]]:
    return contextlib.aclosing(router.generate(request))  # type: ignore[arg-type]


@dataclass(slots=True)
class Claim:
    """One stream's hold on its key; `superseded` once a newer request took the key over."""

    superseded: bool = False


class LiveStreams:
    def __init__(self) -> None:
        self._live: dict[str, Claim] = {}

    @contextlib.contextmanager
    def claim(self, key: str) -> Iterator[Claim]:
        older = self._live.get(key)
        if older is not None:
            older.superseded = True
        claim = self._live[key] = Claim()
        try:
            yield claim
        finally:
            if self._live.get(key) is claim:
                del self._live[key]

    def __len__(self) -> int:
        return len(self._live)
