"""The worker's end of the request channel (`common.channel` describes the wire): a small asyncio server beside
the engine, in the actor's process, that runs each call with the handler the worker registered for its method.

Contract: a connection is served only once it proved the cluster secret (the challenge in `common.channel`); at
most `MAX_CONNECTIONS` are open at once; a caller hanging up cancels its handler (which stops the request in the
engine); a handler that raises ends its call with an `INTERNAL` error frame naming the request, its details only in
this worker's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from common.channel import (
    HELLO_TIMEOUT_S,
    INTERNAL,
    INVALID_ARGUMENT,
    MAX_CONNECTIONS,
    MAX_PROOF_FRAME,
    NONCE_BYTES,
    UNAUTHENTICATED,
    ChannelError,
    frame,
    proof,
    read_frame,
    sampling_from,
)
from common.sampling import SamplingSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Call:
    """One call as a handler sees it: the engine's request id, the prompt, sampling and the KV transfer params."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    kv_params: dict[str, Any] | None


# A method's handler: the call's fields in, the reply's messages out (each written as one frame).
Handler = Callable[[Call], AsyncIterator[dict[str, Any]]]


class ChannelServer:
    """A worker's end: serves the methods in `handlers` (`"Generate"`, `"Prefill"`, ...)."""

    def __init__(self, handlers: dict[str, Handler], secret: str) -> None:
        self._handlers = handlers
        self._secret = secret
        self._server: asyncio.Server | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self.connections = 0  # accepted so far

    async def start(self, host: str, port: int = 0) -> str:
        self._server = await asyncio.start_server(self._handle, host, port)
        return f"{host}:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self, grace: float | None = None) -> None:
        """Stops accepting calls; calls in progress end now (their callers see the connection break)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._calls):
            task.cancel()
        await asyncio.gather(*self._calls, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._calls) >= MAX_CONNECTIONS:  # read nothing, hold nothing
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._calls.add(task)
        self.connections += 1
        try:
            if not await asyncio.wait_for(self._authenticate(reader, writer), HELLO_TIMEOUT_S):
                writer.write(frame({"error": {"code": UNAUTHENTICATED,
                                              "message": "calls to a worker need the cluster secret"}}))
                return
            hello = await read_frame(reader)
            while isinstance(hello, dict):
                head = await self._serve_call(hello, reader, writer)
                if head is None:
                    return
                hello = await read_frame(reader, head)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ChannelError, ValueError):
            pass  # the caller went away or spoke garbage: nothing to answer
        except asyncio.CancelledError:
            pass  # the server stops: the caller sees the connection close
        finally:
            self._calls.discard(task)
            writer.close()

    async def _authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """The challenge: whether the caller's first frame (at most `MAX_PROOF_FRAME` bytes) proves the secret."""
        nonce = os.urandom(NONCE_BYTES)
        writer.write(frame({"nonce": nonce.hex()}))
        answer = await read_frame(reader, limit=MAX_PROOF_FRAME)
        given = answer.get("proof") if isinstance(answer, dict) else None
        return isinstance(given, str) and hmac.compare_digest(given.encode(), proof(self._secret, nonce).encode())

    async def _serve_call(self, hello: dict[str, Any], reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> bytes | None:
        """Serves one call while listening for the caller: returns the bytes of the next call's frame that arrived
        after this one ended, or None when the connection is done (the caller hung up: the call is cancelled)."""
        work = asyncio.create_task(self._serve(hello.get("method"), hello.get("call"), writer))
        listen = asyncio.create_task(reader.read(1))  # b"": the caller hung up; a byte: its next call
        try:
            await asyncio.wait({work, listen}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                head = listen.result()
                if head:  # a caller sends its next call only after this one ended: let the handler finish
                    await work
                return head or None
            if work.exception() is not None:
                return None
            return (listen.result() or None) if listen.done() else b""
        finally:
            for t in (work, listen):
                t.cancel()
            await asyncio.gather(work, listen, return_exceptions=True)

    async def _serve(self, method: Any, call: Any, writer: asyncio.StreamWriter) -> None:
        handler = self._handlers.get(method) if isinstance(method, str) else None
        try:
            if handler is None:
                writer.write(frame({"error": {"code": INVALID_ARGUMENT,
                                              "message": f"this worker serves no method {method!r}"}}))
            else:
                parsed = Call(call["id"], call["prompt"], sampling_from(call["sampling"]), call["kv"])
                async for message in handler(parsed):
                    writer.write(frame(message))
                    await writer.drain()
            await writer.drain()
        except ConnectionError:
            raise
        except Exception:
            request_id = call.get("id") if isinstance(call, dict) else None
            log.exception("request %s failed in the engine", request_id)  # the details stay here, not on the wire
            text = f"the engine failed while running request {request_id}; see the worker's log"
            writer.write(frame({"error": {"code": INTERNAL, "message": text}}))
            with contextlib.suppress(ConnectionError):
                await writer.drain()


async def serve(handlers: dict[str, Handler], host: str, secret: str, port: int = 0) -> tuple[ChannelServer, str]:
    """Serves `handlers` on `host`:`port` (0: a free one); returns the server and its address."""
    server = ChannelServer(handlers, secret)
    return server, await server.start(host, port)
