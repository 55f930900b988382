"""`guarded_protocol`: uvicorn's HTTP/1.1 protocol with a deadline on each request head and a connection cap.

Deadline: a connection's first request head must arrive whole within `timeout_s` of the connection opening; a
later one on the kept-alive connection within `timeout_s` of its first byte. Otherwise the connection is closed:
a client that withholds or trickles its headers (slow loris) holds a connection for that long at most. An idle
kept-alive connection is uvicorn's keep-alive timeout's business, not this one's.

Cap: at most `max_connections` connections are served at once. One more is not handed to uvicorn: once its
request head is in (within the same deadline), it gets 503 with OpenAI's error body and `Retry-After`, and is
closed, while the connections already served go on.

The wrapped protocol is uvicorn's own (httptools where installed, else h11); a request head is complete when the
protocol starts that request's cycle, which both do once the head is parsed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from router.openai_wire import error_body

MAX_REFUSED_HEAD = 64 << 10  # bytes of a refused connection's request head read before it is closed anyway


def refusal(max_connections: int) -> bytes:
    """The whole HTTP response a connection beyond the cap gets."""
    body = json.dumps(error_body(
        f"the server is at its limit of {max_connections} open HTTP connections (router.max_http_connections);"
        " retry shortly, or reuse a kept-alive connection", "server_error", "too_many_connections")).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


class _Guarded(asyncio.Protocol):
    timeout_s: ClassVar[float]  # set per server by `guarded_protocol`
    max_connections: ClassVar[int]
    served: ClassVar[set[_Guarded]]  # this server's connections handed to uvicorn

    def __init__(self, **uvicorn_args: Any) -> None:  # uvicorn's own arguments, passed through unseen
        self._inner: Any = AutoHTTPProtocol(**uvicorn_args)  # type: ignore[call-arg]
        self._cycle: Any = None  # the request cycle the inner protocol ran last
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._refused: bytearray | None = None  # beyond the cap: the request head read so far

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if len(self.served) >= self.max_connections:
            self._refused = bytearray()
        else:
            self.served.add(self)
            self._inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            self._refused += data
            if b"\r\n\r\n" in self._refused or len(self._refused) > MAX_REFUSED_HEAD:
                self._refuse()
            return
        self._inner.data_received(data)
        cycle = self._inner.cycle
        if cycle is not self._cycle:  # a request head is complete
            self._cycle = cycle
            self._disarm()
        elif self._timer is None and (cycle is None or cycle.response_complete):
            self._arm()  # the first bytes of the next request's head: the rest must follow in time

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._refused is None:
            self.served.discard(self)
            self._inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        if self._refused is not None:
            return None  # close
        return self._inner.eof_received()  # type: ignore[no-any-return]

    def pause_writing(self) -> None:
        if self._refused is None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._refused is None:
            self._inner.resume_writing()

    def _refuse(self) -> None:
        self._disarm()
        assert self._transport is not None
        if not self._transport.is_closing():
            self._transport.write(refusal(self.max_connections))
            self._transport.close()  # after the response is flushed

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


def guarded_protocol(timeout_s: float, max_connections: int) -> type[asyncio.Protocol]:
    """The protocol class to give uvicorn (`http=`): request heads within `timeout_s` seconds, at most
    `max_connections` connections served at once."""
    attrs = {"timeout_s": timeout_s, "max_connections": max_connections, "served": set()}
    return type("GuardedHTTPProtocol", (_Guarded,), attrs)
