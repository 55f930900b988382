"""What every frontend (gRPC, HTTP) does alike once its wire format is parsed.

- `deadline_after`: the client's timeout, seconds from now, becomes the request's deadline on the monotonic
  clock the router uses.
- `open_stream`: the router's deltas for one request, as an async context manager. Leaving it before the last
  delta (the client went away, the response failed) closes the router's generator there and then, which stops
  the request in the engines at once rather than whenever the garbage collector finds the suspended generator.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator

from pdserve.router.request import Request
from pdserve.router.service import Delta, Router


def deadline_after(timeout_s: float | None) -> float | None:
    """`time.monotonic()` after which the request is abandoned; None (no timeout) means never."""
    return None if timeout_s is None else time.monotonic() + timeout_s


def open_stream(router: Router, request: Request) -> contextlib.aclosing[AsyncGenerator[Delta, None]]:
    return contextlib.aclosing(router.generate(request))  # type: ignore[arg-type]
