"""Synchronous and asyncio clients for pdserve's gRPC API.

    with Client("localhost:50051") as client:
        for chunk in client.generate("Hello", max_tokens=32, temperature=0.0):
            print(chunk.text, end="")

`generate` returns a stream: iterate it for `Chunk`s (the last one carries `final`), call `cancel()` to stop the
request on the server, or leave the loop early (the stream is cancelled when it is closed or collected).
`timeout` is the whole call's deadline in seconds. Failures raise the typed errors of `pdserve_client.errors`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc

from pdserve_client import _wire
from pdserve_client._wire import Prompt, Sampling
from pdserve_client.errors import Cancelled, from_rpc_error
from pdserve_client.types import Chunk, Completion, ServerInfo
from pdserve_client.v1 import pdserve_pb2 as pb
from pdserve_client.v1 import pdserve_pb2_grpc as pb_grpc


def _collect(request_id: str, chunks: list[Chunk]) -> Completion:
    ids = [t for c in chunks for t in c.token_ids]
    text = "".join(c.text for c in chunks)
    return Completion(request_id=request_id, token_ids=ids, text=text, final=chunks[-1].final if chunks else None)


class Stream:
    """A running generation (sync). Iterate for chunks; `cancel()` stops it on the server."""

    def __init__(self, call: grpc.Call) -> None:
        self._call = call

    def __iter__(self) -> Iterator[Chunk]:
        try:
            for msg in self._call:  # type: ignore[attr-defined]
                yield _wire.chunk_from_proto(msg)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class Client:
    """Blocking client. `target` is "host:port"; `channel` overrides it with a ready channel."""

    def __init__(self, target: str = "localhost:50051", channel: grpc.Channel | None = None) -> None:
        self._channel = channel or grpc.insecure_channel(target)
        self._stub = pb_grpc.GenerationStub(self._channel)

    def generate(
        self,
        prompt: Prompt,
        *,
        sampling: Sampling | None = None,
        model: str = "",
        timeout: float | None = None,
        **sampling_fields: object,
    ) -> Stream:
        """Starts a generation. Sampling fields may be given directly: max_tokens=32, temperature=0.0, ..."""
        request = _wire.build_request(prompt, sampling or Sampling(**sampling_fields), model)  # type: ignore[arg-type]
        return Stream(self._stub.Generate(request, timeout=timeout))

    def complete(self, prompt: Prompt, *, timeout: float | None = None, **sampling_fields: object) -> Completion:
        """Runs a generation to its end and returns it whole."""
        chunks = list(self.generate(prompt, timeout=timeout, **sampling_fields))
        return _collect(chunks[0].request_id if chunks else "", chunks)

    def server_info(self, timeout: float | None = 10.0) -> ServerInfo:
        try:
            return _wire.server_info_from_proto(self._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=timeout))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def list_models(self, timeout: float | None = 10.0) -> list[str]:
        try:
            reply = self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return [m.id for m in reply.models]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream:
    """A running generation (asyncio). `async for` it for chunks; `cancel()` stops it on the server."""

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self._call = call
        self._cancelled = False

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        try:
            async for msg in self._call:
                yield _wire.chunk_from_proto(msg)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        except asyncio.CancelledError:
            # grpc.aio reports a call cancelled through cancel() as CancelledError; the sync client raises
            # Cancelled there, and so does this one. A cancelled task still gets its CancelledError.
            if not self._cancelled:
                raise
            raise Cancelled("the stream was cancelled by the client") from None

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()


class AsyncClient:
    """asyncio client; create it inside a running event loop."""

    def __init__(self, target: str = "localhost:50051", channel: grpc.aio.Channel | None = None) -> None:
        self._channel = channel or grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.GenerationStub(self._channel)

    def generate(
        self,
        prompt: Prompt,
        *,
        sampling: Sampling | None = None,
        model: str = "",
        timeout: float | None = None,
        **sampling_fields: object,
    ) -> AsyncStream:
        request = _wire.build_request(prompt, sampling or Sampling(**sampling_fields), model)  # type: ignore[arg-type]
        return AsyncStream(self._stub.Generate(request, timeout=timeout))

    async def complete(self, prompt: Prompt, *, timeout: float | None = None, **sampling_fields: object) -> Completion:
        chunks = [c async for c in self.generate(prompt, timeout=timeout, **sampling_fields)]
        return _collect(chunks[0].request_id if chunks else "", chunks)

    async def server_info(self, timeout: float | None = 10.0) -> ServerInfo:
        try:
            reply = await self._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return _wire.server_info_from_proto(reply)

    async def list_models(self, timeout: float | None = 10.0) -> list[str]:
        try:
            reply = await self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return [m.id for m in reply.models]

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
