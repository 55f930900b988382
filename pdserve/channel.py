"""The request channel: how a request's own traffic travels between the router and a worker.

Ray carries the workers' lifecycle (start, stats, abort, release, shutdown). A request's prompt and its tokens
travel on a plain TCP connection from the router straight to the worker's actor process, where a small asyncio
server runs beside the engine. One connection per call: a Ray actor call costs about 2.5 ms on a 2-core host and a
Ray stream about 1 ms per item, a gRPC stream on loopback about 1.2 ms to its first item and 0.5 ms per item, this
channel a fraction of that (`pdserve bench overhead` measures the whole path).

Wire: every frame is a 4-byte big-endian length and that many bytes of JSON (never pickle). The caller opens with
`{"secret", "method": "Generate" | "Prefill", "call"}`; the worker answers with
`{"chunk": EngineChunk}`... (`Generate`), one `{"result": PrefillResult}` (`Prefill`), or
`{"error": {"code", "message"}}`, and closes the connection. A `Generate` whose engine ended without a finish reason
ends with `{"end": true}`.

Contract:
- A worker accepts calls only with the cluster secret (`UNAUTHENTICATED` otherwise) and frames of at most
  `MAX_FRAME` bytes.
- The caller closing the connection (the router does when its client goes away or a deadline passes) cancels the
  worker's handler, which stops the request in the engine.
- The router sees `WorkerGone` when the worker cannot be reached or its connection breaks before the call ended (its
  process died), and `EngineFailure` for a call the worker ended with an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import struct
from typing import Any

from pdserve.engine import EngineChunk
from pdserve.router.errors import EngineFailure
from pdserve.router.request import SamplingSpec

log = logging.getLogger(__name__)

LENGTH = struct.Struct("!I")
MAX_FRAME = 64 << 20
HELLO_TIMEOUT_S = 10.0  # a connection that says nothing for this long is dropped
UNAUTHENTICATED, INTERNAL, INVALID_ARGUMENT = "UNAUTHENTICATED", "INTERNAL", "INVALID_ARGUMENT"


class ChannelError(Exception):
    """A frame that breaks the protocol."""


def _frame(message: Any) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return LENGTH.pack(len(body)) + body


async def _read(reader: asyncio.StreamReader) -> Any:
    (n,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
    if n > MAX_FRAME:
        raise ChannelError(f"a frame of {n} bytes; the limit is {MAX_FRAME}")
    return json.loads(await reader.readexactly(n))


def _call(request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec,
          kv_params: dict[str, Any] | None) -> dict[str, Any]:
    return {"id": request_id, "prompt": prompt_token_ids, "sampling": dataclasses.asdict(sampling), "kv": kv_params}


def _sampling(fields: dict[str, Any]) -> SamplingSpec:
    return SamplingSpec(**{**fields, "stop_token_ids": tuple(fields["stop_token_ids"])})


class ChannelServer:
    """A worker's end: serves `worker.generate` and `worker.prefill` (those it has)."""

    def __init__(self, worker: Any, secret: str) -> None:
        self._worker = worker
        self._secret = secret
        self._server: asyncio.Server | None = None
        self._calls: set[asyncio.Task[None]] = set()

    async def start(self, host: str) -> str:
        self._server = await asyncio.start_server(self._handle, host, 0)
        return f"{host}:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self, grace: float | None = None) -> None:
        """Stops accepting calls; calls in progress end now (their callers see the connection break)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._calls):
            task.cancel()
        await asyncio.gather(*self._calls, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._calls.add(task)
        try:
            hello = await asyncio.wait_for(_read(reader), HELLO_TIMEOUT_S)
            if not isinstance(hello, dict) or not hmac.compare_digest(str(hello.get("secret", "")), self._secret):
                writer.write(_frame({"error": {"code": UNAUTHENTICATED,
                                               "message": "calls to a worker need the cluster secret"}}))
                return
            work = asyncio.create_task(self._serve(hello.get("method"), hello.get("call"), writer))
            gone = asyncio.create_task(reader.read(1))  # the caller hung up: it cancelled the call
            try:
                await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (work, gone):
                    t.cancel()
                await asyncio.gather(work, gone, return_exceptions=True)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ChannelError, ValueError):
            pass  # the caller went away or spoke garbage: nothing to answer
        except asyncio.CancelledError:
            pass  # the server stops: the caller sees the connection close
        finally:
            self._calls.discard(task)
            writer.close()

    async def _serve(self, method: Any, call: Any, writer: asyncio.StreamWriter) -> None:
        worker = self._worker
        try:
            if method == "Generate" and hasattr(worker, "generate"):
                finished = False
                async for chunk in worker.generate(call["id"], call["prompt"], _sampling(call["sampling"]),
                                                   call["kv"]):
                    writer.write(_frame({"chunk": dataclasses.asdict(chunk)}))
                    await writer.drain()
                    finished = chunk.finish_reason is not None
                if not finished:
                    writer.write(_frame({"end": True}))
            elif method == "Prefill" and hasattr(worker, "prefill"):
                result = await worker.prefill(call["id"], call["prompt"], _sampling(call["sampling"]), call["kv"])
                writer.write(_frame({"result": dataclasses.asdict(result)}))
            else:
                writer.write(_frame({"error": {"code": INVALID_ARGUMENT,
                                               "message": f"this worker serves no method {method!r}"}}))
            await writer.drain()
        except ConnectionError:
            raise
        except Exception as e:
            log.exception("request %s failed in the engine", call.get("id") if isinstance(call, dict) else None)
            writer.write(_frame({"error": {"code": INTERNAL, "message": f"{type(e).__name__}: {e}"}}))
            with contextlib.suppress(ConnectionError):
                await writer.drain()


async def serve(worker: Any, host: str, secret: str) -> tuple[ChannelServer, str]:
    """Serves `worker` on `host`, a free port; returns the server and its address."""
    server = ChannelServer(worker, secret)
    return server, await server.start(host)


class WorkerGone(EngineFailure):
    """The worker could not be reached (its process died, its node left): the call did not complete."""


def _failure(message: dict[str, Any]) -> EngineFailure:
    error = message.get("error") or {}
    return EngineFailure(f"the worker failed: {error.get('code', INTERNAL)}: {error.get('message', message)}")


class _Connection:
    """One call's connection: opened with the hello, read frame by frame, closed by either end."""

    def __init__(self, address: str, hello: dict[str, Any]) -> None:
        self._address = address
        self._hello = hello
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.closed = False

    async def open(self) -> None:
        host, _, port = self._address.rpartition(":")
        try:
            self._reader, self._writer = await asyncio.open_connection(host, int(port))
        except OSError as e:
            raise WorkerGone(f"the worker at {self._address} cannot be reached: {e}") from None
        if self.closed:  # cancelled while connecting
            self._writer.transport.abort()
            raise EngineFailure("the call was cancelled")
        self._writer.write(_frame(self._hello))

    async def read(self) -> dict[str, Any]:
        if self._reader is None:
            await self.open()
        assert self._reader is not None
        try:
            message = await _read(self._reader)
        except (OSError, asyncio.IncompleteReadError, ChannelError, ValueError) as e:
            if self.closed:  # our own cancel() broke it
                raise EngineFailure("the call was cancelled") from None
            self.close()
            raise WorkerGone(f"the connection to the worker at {self._address} broke: {e!r}") from None
        if not isinstance(message, dict):
            self.close()
            raise WorkerGone(f"the worker at {self._address} sent {message!r}")
        return message

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._writer is not None:
                self._writer.transport.abort()


class ChunkStream:
    """One `Generate` call: `next()` is the engine's next chunk; `cancel()` stops the request in the engine."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    async def next(self) -> EngineChunk:
        if self._connection.closed:
            raise EngineFailure("the call has ended")
        message = await self._connection.read()
        if "chunk" in message:
            chunk = EngineChunk(**message["chunk"])
            if chunk.finish_reason is not None:
                self._connection.close()
            return chunk
        self._connection.close()
        if message.get("end"):
            raise EngineFailure("the worker ended the stream without a finish reason")
        raise _failure(message)

    def cancel(self) -> None:
        self._connection.close()


class WorkerChannel:
    """The router's end of one worker's request channel. Create it inside the router's event loop."""

    def __init__(self, address: str, secret: str) -> None:
        self.address = address
        self._secret = secret

    def _connection(self, method: str, call: dict[str, Any]) -> _Connection:
        return _Connection(self.address, {"secret": self._secret, "method": method, "call": call})

    def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec,
                 kv_params: dict[str, Any] | None = None) -> ChunkStream:
        return ChunkStream(self._connection("Generate", _call(request_id, prompt_token_ids, sampling, kv_params)))

    async def prefill(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec,
                      kv_params: dict[str, Any]) -> Any:
        from pdserve.prefill.worker import PrefillResult

        connection = self._connection("Prefill", _call(request_id, prompt_token_ids, sampling, kv_params))
        try:
            message = await connection.read()
        finally:
            connection.close()  # also when the caller gave up: the worker stops the request
        if "result" not in message:
            raise _failure(message)
        return PrefillResult(**message["result"])

    async def close(self) -> None:
        """Nothing to release: every call owns its connection."""
