"""`head_timeout_protocol`: uvicorn's HTTP/1.1 protocol with a deadline on each request head.

A connection's first request head must arrive whole within `timeout_s` of the connection opening; a later one on
the kept-alive connection within `timeout_s` of its first byte. Otherwise the connection is closed: a client that
withholds or trickles its headers (slow loris) holds a connection for that long at most. An idle kept-alive
connection is uvicorn's keep-alive timeout's business, not this one's.

The wrapped protocol is uvicorn's own (httptools where installed, else h11); a request head is complete when the
protocol starts that request's cycle, which both do once the head is parsed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol


class _HeadTimeout(asyncio.Protocol):
    timeout_s: float  # set per server by `head_timeout_protocol`

    def __init__(self, **uvicorn_args: Any) -> None:  # uvicorn's own arguments, passed through unseen
        self._inner: Any = AutoHTTPProtocol(**uvicorn_args)  # type: ignore[call-arg]
        self._cycle: Any = None  # the request cycle the inner protocol ran last
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)
        cycle = self._inner.cycle
        if cycle is not self._cycle:  # a request head is complete
            self._cycle = cycle
            self._disarm()
        elif self._timer is None and (cycle is None or cycle.response_complete):
            self._arm()  # the first bytes of the next request's head: the rest must follow in time

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()  # type: ignore[no-any-return]

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _arm(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()


def head_timeout_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """The protocol class to give uvicorn (`http=`) for a deadline of `timeout_s` seconds on request heads."""
    return type("HeadTimeoutProtocol", (_HeadTimeout,), {"timeout_s": timeout_s})
