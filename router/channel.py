"""The router's end of the request channel (`common.channel` describes the wire): one `WorkerChannel` per
worker, pooling idle connections, so a call usually costs no connect.

The router sees `WorkerGone` when the worker cannot be reached or its connection breaks before the call ended
(its process died), and `EngineFailure` for a call the worker ended with an error.
"""

from __future__ import annotations

import asyncio
from typing import Any

from common.channel import INTERNAL, MAX_PROOF_FRAME, NONCE_BYTES, ChannelError, call_message, frame, proof, read_frame
from common.errors import EngineFailure
from common.results import EngineChunk, PrefillResult
from common.sampling import SamplingSpec

MAX_IDLE = 32  # idle connections the router keeps open to one worker


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
            await self._answer_challenge()
        self._stream = stream
        stream[1].write(frame(self._hello))
        return stream

    async def _answer_challenge(self) -> None:
        """A new connection: the worker's nonce in, our proof of the secret out (never the secret itself)."""
        message = await self._read(MAX_PROOF_FRAME)
        nonce = message.get("nonce")
        try:
            raw = bytes.fromhex(nonce) if isinstance(nonce, str) else b""
        except ValueError:
            raw = b""
        if len(raw) != NONCE_BYTES:
            self.close()
            raise WorkerGone(f"the worker at {self._channel.address} sent {message!r} instead of a challenge")
        assert self._stream is not None
        self._stream[1].write(frame({"proof": proof(self._channel._secret, raw)}))

    async def read(self) -> dict[str, Any]:
        if self._stream is None:
            await self.open()
        return await self._read()

    async def _read(self, limit: int | None = None) -> dict[str, Any]:
        assert self._stream is not None
        reader = self._stream[0]
        try:
            message = await read_frame(reader) if limit is None else await read_frame(reader, limit=limit)
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
        return _Connection(self, {"method": method, "call": call})

    def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec,
                 kv_params: dict[str, Any] | None = None) -> ChunkStream:
        call = call_message(request_id, prompt_token_ids, sampling, kv_params)
        return ChunkStream(self._connection("Generate", call))

    async def prefill(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec,
                      kv_params: dict[str, Any]) -> PrefillResult:
        connection = self._connection("Prefill", call_message(request_id, prompt_token_ids, sampling, kv_params))
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
