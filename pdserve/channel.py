"""The request channel: how a request's own traffic travels between the router and a worker.

Ray carries the workers' lifecycle (start, stats, abort, release, shutdown). A request's prompt and its tokens
travel on a plain TCP connection from the router straight to the worker's actor process, where a small asyncio
server runs beside the engine. A Ray actor call costs about 2.5 ms on a 2-core host and a Ray stream about 1 ms per
item, a gRPC stream on loopback about 1.2 ms to its first item and 0.5 ms per item, this channel a fraction of that
(`pdserve bench overhead` measures the whole path).

Wire: every frame is a 4-byte big-endian length and that many bytes of JSON (never pickle). A call opens with
`{"secret", "method": "Generate" | "Prefill", "call"}`; the worker answers with `{"chunk": EngineChunk}`...
(`Generate`, the last one carrying a finish reason), one `{"result": PrefillResult}` (`Prefill`), or
`{"error": {"code", "message"}}`. A `Generate` whose engine ended without a finish reason ends with
`{"end": true}`. A connection carries one call at a time; once a call has ended the router may send the next
call's opening frame on the same connection (it keeps up to `MAX_IDLE` idle connections per worker), so a call
usually costs no connect.

Contract:
- A worker accepts calls only with the cluster secret (`UNAUTHENTICATED` otherwise, and the connection closes) and
  frames of at most `MAX_FRAME` bytes; a new connection must open its first call within `HELLO_TIMEOUT_S`.
- The caller closing the connection during a call (the router does when its client goes away or a deadline
  passes) cancels the worker's handler, which stops the request in the engine. A connection whose call did not end
  cleanly is never used again.
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
HELLO_TIMEOUT_S = 10.0  # a new connection that says nothing for this long is dropped
MAX_IDLE = 32  # idle connections the router keeps open to one worker
UNAUTHENTICATED, INTERNAL, INVALID_ARGUMENT = "UNAUTHENTICATED", "INTERNAL", "INVALID_ARGUMENT"


class ChannelError(Exception):
    """A frame that breaks the protocol."""


def _frame(message: Any) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return LENGTH.pack(len(body)) + body


async def _read(reader: asyncio.StreamReader, head: bytes = b"") -> Any:
    """The next frame; `head`: its first bytes, already read."""
    (n,) = LENGTH.unpack(head + await reader.readexactly(LENGTH.size - len(head)))
    if n > MAX_FRAME:
        raise ChannelError(f"a frame of {n} bytes; the limit is {MAX_FRAME}")
    return json.loads(await reader.readexactly(n))


def _fields(obj: Any) -> dict[str, Any]:
    """A dataclass's fields by name, values as they are: unlike `dataclasses.asdict`, no deep copy of every
    message on the way to JSON (which writes tuples as lists; `_sampling` turns them back)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _call(request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec,
          kv_params: dict[str, Any] | None) -> dict[str, Any]:
    return {"id": request_id, "prompt": prompt_token_ids, "sampling": _fields(sampling), "kv": kv_params}


def _sampling(fields: dict[str, Any]) -> SamplingSpec:
    return SamplingSpec(**{**fields, "stop_token_ids": tuple(fields["stop_token_ids"])})


class ChannelServer:
    """A worker's end: serves `worker.generate` and `worker.prefill` (those it has)."""

    def __init__(self, worker: Any, secret: str) -> None:
        self._worker = worker
        self._secret = secret
        self._server: asyncio.Server | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self.connections = 0  # accepted so far

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
        self.connections += 1
        try:
            hello = await asyncio.wait_for(_read(reader), HELLO_TIMEOUT_S)
            while True:
                if not isinstance(hello, dict) or not hmac.compare_digest(str(hello.get("secret", "")),
                                                                          self._secret):
                    writer.write(_frame({"error": {"code": UNAUTHENTICATED,
                                                   "message": "calls to a worker need the cluster secret"}}))
                    return
                head = await self._call(hello, reader, writer)
                if head is None:
                    return
                hello = await _read(reader, head)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ChannelError, ValueError):
            pass  # the caller went away or spoke garbage: nothing to answer
        except asyncio.CancelledError:
            pass  # the server stops: the caller sees the connection close
        finally:
            self._calls.discard(task)
            writer.close()

    async def _call(self, hello: dict[str, Any], reader: asyncio.StreamReader,
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
        worker = self._worker
        try:
            if method == "Generate" and hasattr(worker, "generate"):
                finished = False
                async for chunk in worker.generate(call["id"], call["prompt"], _sampling(call["sampling"]),
                                                   call["kv"]):
                    writer.write(_frame({"chunk": _fields(chunk)}))
                    await writer.drain()
                    finished = chunk.finish_reason is not None
                if not finished:
                    writer.write(_frame({"end": True}))
            elif method == "Prefill" and hasattr(worker, "prefill"):
                result = await worker.prefill(call["id"], call["prompt"], _sampling(call["sampling"]), call["kv"])
                writer.write(_frame({"result": _fields(result)}))
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


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _Connection:
    """One call on a connection: a pooled idle one or a new one, read frame by frame; `done()` once the call has
    ended cleanly gives the connection back to the pool, `close()` (a cancel) closes it."""

    def __init__(self, channel: WorkerChannel, hello: dict[str, Any]) -> None:
        self._channel = channel
        self._hello = hello
        self._stream: Stream | None = None
        self.closed = False

    async def open(self) -> Stream:
        stream = self._channel._idle_stream()
        if stream is None:
            host, _, port = self._channel.address.rpartition(":")
            try:
                stream = await asyncio.open_connection(host, int(port))
            except OSError as e:
                raise WorkerGone(f"the worker at {self._channel.address} cannot be reached: {e}") from None
            if self.closed:  # cancelled while connecting
                stream[1].transport.abort()
                raise EngineFailure("the call was cancelled")
        self._stream = stream
        stream[1].write(_frame(self._hello))
        return stream

    async def read(self) -> dict[str, Any]:
        reader, _ = self._stream or await self.open()
        try:
            message = await _read(reader)
        except (OSError, asyncio.IncompleteReadError, ChannelError, ValueError) as e:
            if self.closed:  # our own cancel() broke it
                raise EngineFailure("the call was cancelled") from None
            self.close()
            raise WorkerGone(f"the connection to the worker at {self._channel.address} broke: {e!r}") from None
        if not isinstance(message, dict):
            self.close()
            raise WorkerGone(f"the worker at {self._channel.address} sent {message!r}")
        return message

    def done(self) -> None:
        if not self.closed:
            self.closed = True
            if self._stream is not None:
                self._channel._give_back(self._stream)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._stream is not None:
                self._stream[1].transport.abort()


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
                self._connection.done()
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
        self._idle: list[Stream] = []

    def _idle_stream(self) -> Stream | None:
        while self._idle:
            reader, writer = self._idle.pop()
            if not (reader.at_eof() or writer.transport.is_closing()):
                return reader, writer
            writer.transport.abort()  # the worker closed it (it stopped)
        return None

    def _give_back(self, stream: Stream) -> None:
        if len(self._idle) < MAX_IDLE:
            self._idle.append(stream)
        else:
            stream[1].transport.abort()

    def _connection(self, method: str, call: dict[str, Any]) -> _Connection:
        return _Connection(self, {"secret": self._secret, "method": method, "call": call})

    def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec,
                 kv_params: dict[str, Any] | None = None) -> ChunkStream:
        return ChunkStream(self._connection("Generate", _call(request_id, prompt_token_ids, sampling, kv_params)))

    async def prefill(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec,
                      kv_params: dict[str, Any]) -> Any:
        from pdserve.prefill.worker import PrefillResult

        connection = self._connection("Prefill", _call(request_id, prompt_token_ids, sampling, kv_params))
        try:
            message = await connection.read()
            if "result" in message:
                connection.done()
                return PrefillResult(**message["result"])
            raise _failure(message)
        finally:
            connection.close()  # when the caller gave up, or the call failed: the worker stops the request

    async def close(self) -> None:
        """Closes the idle connections."""
        while self._idle:
            self._idle.pop()[1].transport.abort()
