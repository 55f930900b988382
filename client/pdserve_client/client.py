"""Synchronous and asyncio clients for pdserve's gRPC API.

    with Client("localhost:50051") as client:
        for chunk in client.generate("Hello", max_tokens=32, temperature=0.0):
            print(chunk.text, end="")

`generate` returns a stream: iterate it for `Chunk`s (the last one carries `final`), call `cancel()` to stop the
request on the server, or leave the loop early (the stream is cancelled when it is closed or collected).
Failures raise the typed errors of `pdserve_client.errors`.

- Deadlines: every call takes `timeout`, in seconds, for the whole call, its retries included.
- Security: `tls=Tls(...)` speaks TLS (mutual with a client certificate); `token=` sends
  `authorization: Bearer <token>` with every call.
- Retries (`Retry`, see `retry.py`): UNAVAILABLE is tried again after an exponential backoff with jitter, up to
  `max_attempts` attempts; RESOURCE_EXHAUSTED too when asked, after the server's retry hint.
- Resume: every generation carries a key (`request_id`: the caller's or a fresh one). When its stream breaks
  with UNAVAILABLE after some chunks (the router restarted, a proxy dropped the connection), the stream resends
  the request with the same key and the token ids received so far; the server continues after them. The chunks
  the caller sees have no gap and no repeat (with greedy sampling, exactly the undisturbed output);
  `Stream.resumes` counts the resumptions. The final chunk's usage counts every token; its timings are the
  last attempt's.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import grpc

from pdserve_client import _wire
from pdserve_client._wire import Prompt, Sampling
from pdserve_client.errors import Cancelled, PdserveError, from_rpc_error
from pdserve_client.retry import Retry
from pdserve_client.tls import Tls
from pdserve_client.types import Chunk, Completion, ServerInfo
from pdserve_client.v1 import pdserve_pb2 as pb
from pdserve_client.v1 import pdserve_pb2_grpc as pb_grpc

T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...] | None


def _collect(request_id: str, chunks: list[Chunk]) -> Completion:
    ids = [t for c in chunks for t in c.token_ids]
    text = "".join(c.text for c in chunks)
    return Completion(request_id=request_id, token_ids=ids, text=text, final=chunks[-1].final if chunks else None)


def _metadata(token: str | None) -> Metadata:
    return (("authorization", f"Bearer {token}"),) if token else None


class _Attempts:
    """One call's attempts: the time left of its deadline, and whether (and how long) to wait after a failure."""

    def __init__(self, retry: Retry, timeout: float | None, rng: random.Random) -> None:
        self._retry = retry
        self._rng = rng
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self.failures = 0

    def timeout(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def progressed(self) -> None:
        self.failures = 0

    def after_failure(self, error: PdserveError) -> float | None:
        """Seconds to wait before trying again; None: report `error`."""
        self.failures += 1
        wait = self._retry.delay(error.code, self.failures, error.retry_after_s, self._rng)
        if wait is None or (self._deadline is not None and time.monotonic() + wait >= self._deadline):
            return None
        return wait


class _Generation:
    """What a stream knows across its attempts: the request, the token ids received, the attempts."""

    def __init__(self, request: pb.GenerateRequest, retry: Retry, attempts: _Attempts) -> None:
        self.request = request
        self.received: list[int] = []
        self.resumes = 0
        self._retry = retry
        self.attempts = attempts

    def chunk(self, msg: pb.GenerateResponse) -> Chunk:
        chunk = _wire.chunk_from_proto(msg)
        self.received += chunk.token_ids
        self.attempts.progressed()
        return chunk

    def after_failure(self, error: PdserveError) -> float | None:
        if self.received and (not self._retry.resume or len(self.received) >= self.request.sampling.max_tokens):
            return None
        wait = self.attempts.after_failure(error)
        if wait is not None and self.received:
            self.resumes += 1
        return wait

    def next_request(self) -> pb.GenerateRequest:
        return _wire.resumed(self.request, self.received) if self.received else self.request


class _Attempting:
    """What the sync and asyncio streams share: the generation across attempts and the current call."""

    def __init__(self, start: Callable[[pb.GenerateRequest, float | None], Any], generation: _Generation) -> None:
        self._start = start
        self._gen = generation
        self._call = start(generation.request, generation.attempts.timeout())

    @property
    def request_id(self) -> str:
        return self._gen.request.request_id

    @property
    def resumes(self) -> int:
        """How many times the stream broke and was resumed."""
        return self._gen.resumes


class Stream(_Attempting):
    """A running generation (sync). Iterate for chunks; `cancel()` stops it on the server."""

    def __init__(self, start: Callable[[pb.GenerateRequest, float | None], Any], generation: _Generation) -> None:
        self._cancelled = threading.Event()
        super().__init__(start, generation)

    def __iter__(self) -> Iterator[Chunk]:
        while True:
            try:
                for msg in self._call:
                    yield self._gen.chunk(msg)
                return
            except grpc.RpcError as e:
                error = from_rpc_error(e)
                wait = None if self._cancelled.is_set() else self._gen.after_failure(error)
                if wait is None:
                    raise error from None
            if self._cancelled.wait(wait):  # cancel() ends the wait at once
                raise Cancelled("the stream was cancelled by the client")
            self._call = self._start(self._gen.next_request(), self._gen.attempts.timeout())
            if self._cancelled.is_set():
                self._call.cancel()

    def cancel(self) -> None:
        self._cancelled.set()
        self._call.cancel()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


def _secure_channel(target: str, tls: Tls | None, aio: bool) -> Any:
    if tls is None:
        return grpc.aio.insecure_channel(target) if aio else grpc.insecure_channel(target)
    factory = grpc.aio.secure_channel if aio else grpc.secure_channel
    return factory(target, tls.credentials(), options=tls.channel_options())


class _Options:
    """What both clients hold alike: call metadata, retry policy, jitter source."""

    def __init__(self, token: str | None, retry: Retry | None) -> None:
        self.metadata = _metadata(token)
        self.retry = retry or Retry()
        self.rng = random.Random()

    def generation(
        self, prompt: Prompt, sampling: Sampling, model: str, request_id: str | None, timeout: float | None
    ) -> _Generation:
        request = _wire.build_request(prompt, sampling, model, request_id or uuid.uuid4().hex)
        return _Generation(request, self.retry, _Attempts(self.retry, timeout, self.rng))


class Client:
    """Blocking client. `target` is "host:port"; `channel` overrides it with a ready channel (then `tls` is not
    used). `tls`: TLS settings (None: plaintext); `token`: bearer token sent with every call; `retry`: the retry
    policy (default `Retry()`: 3 attempts on UNAVAILABLE)."""

    def __init__(
        self,
        target: str = "localhost:50051",
        channel: grpc.Channel | None = None,
        *,
        tls: Tls | None = None,
        token: str | None = None,
        retry: Retry | None = None,
    ) -> None:
        self._channel = channel or _secure_channel(target, tls, aio=False)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._options = _Options(token, retry)

    def generate(
        self,
        prompt: Prompt,
        *,
        sampling: Sampling | None = None,
        model: str = "",
        timeout: float | None = None,
        request_id: str | None = None,
        **sampling_fields: object,
    ) -> Stream:
        """Starts a generation. Sampling fields may be given directly: max_tokens=32, temperature=0.0, ...
        `request_id` is the request's key (default: a fresh one); `timeout` the whole call's deadline."""
        sampling = sampling or Sampling(**sampling_fields)  # type: ignore[arg-type]
        generation = self._options.generation(prompt, sampling, model, request_id, timeout)
        metadata = self._options.metadata

        def start(request: pb.GenerateRequest, remaining: float | None) -> Any:
            return self._stub.Generate(request, timeout=remaining, metadata=metadata)

        return Stream(start, generation)

    def complete(self, prompt: Prompt, *, timeout: float | None = None, **sampling_fields: object) -> Completion:
        """Runs a generation to its end and returns it whole."""
        chunks = list(self.generate(prompt, timeout=timeout, **sampling_fields))  # type: ignore[arg-type]
        return _collect(chunks[0].request_id if chunks else "", chunks)

    def server_info(self, timeout: float | None = 10.0) -> ServerInfo:
        reply = self._unary(self._stub.GetServerInfo, pb.GetServerInfoRequest(), timeout)
        return _wire.server_info_from_proto(reply)

    def list_models(self, timeout: float | None = 10.0) -> list[str]:
        reply = self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [m.id for m in reply.models]

    def _unary(self, method: Callable[..., T], request: Any, timeout: float | None) -> T:
        attempts = _Attempts(self._options.retry, timeout, self._options.rng)
        while True:
            try:
                return method(request, timeout=attempts.timeout(), metadata=self._options.metadata)
            except grpc.RpcError as e:
                error = from_rpc_error(e)
                wait = attempts.after_failure(error)
                if wait is None:
                    raise error from None
            time.sleep(wait)  # the backoff before the next attempt

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream(_Attempting):
    """A running generation (asyncio). `async for` it for chunks; `cancel()` stops it on the server."""

    def __init__(self, start: Callable[[pb.GenerateRequest, float | None], Any], generation: _Generation) -> None:
        self._cancelled = False
        self._wake = asyncio.Event()
        super().__init__(start, generation)

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        while True:
            try:
                async for msg in self._call:
                    yield self._gen.chunk(msg)
                return
            except grpc.RpcError as e:
                error = from_rpc_error(e)
                wait = None if self._cancelled else self._gen.after_failure(error)
                if wait is None:
                    raise error from None
            except asyncio.CancelledError:
                # grpc.aio reports a call cancelled through cancel() as CancelledError; the sync client raises
                # Cancelled there, and so does this one. A cancelled task still gets its CancelledError.
                if not self._cancelled:
                    raise
                raise Cancelled("the stream was cancelled by the client") from None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)  # cancel() ends the backoff at once
            if self._cancelled:
                raise Cancelled("the stream was cancelled by the client")
            self._call = self._start(self._gen.next_request(), self._gen.attempts.timeout())

    def cancel(self) -> None:
        self._cancelled = True
        self._wake.set()
        self._call.cancel()


class AsyncClient:
    """asyncio client; create it inside a running event loop. Same options as `Client`."""

    def __init__(
        self,
        target: str = "localhost:50051",
        channel: grpc.aio.Channel | None = None,
        *,
        tls: Tls | None = None,
        token: str | None = None,
        retry: Retry | None = None,
    ) -> None:
        self._channel = channel or _secure_channel(target, tls, aio=True)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._options = _Options(token, retry)

    def generate(
        self,
        prompt: Prompt,
        *,
        sampling: Sampling | None = None,
        model: str = "",
        timeout: float | None = None,
        request_id: str | None = None,
        **sampling_fields: object,
    ) -> AsyncStream:
        sampling = sampling or Sampling(**sampling_fields)  # type: ignore[arg-type]
        generation = self._options.generation(prompt, sampling, model, request_id, timeout)
        metadata = self._options.metadata

        def start(request: pb.GenerateRequest, remaining: float | None) -> Any:
            return self._stub.Generate(request, timeout=remaining, metadata=metadata)

        return AsyncStream(start, generation)

    async def complete(self, prompt: Prompt, *, timeout: float | None = None, **sampling_fields: object) -> Completion:
        chunks = [c async for c in self.generate(prompt, timeout=timeout, **sampling_fields)]  # type: ignore[arg-type]
        return _collect(chunks[0].request_id if chunks else "", chunks)

    async def server_info(self, timeout: float | None = 10.0) -> ServerInfo:
        reply = await self._unary(self._stub.GetServerInfo, pb.GetServerInfoRequest(), timeout)
        return _wire.server_info_from_proto(reply)

    async def list_models(self, timeout: float | None = 10.0) -> list[str]:
        reply = await self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [m.id for m in reply.models]

    async def _unary(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        attempts = _Attempts(self._options.retry, timeout, self._options.rng)
        while True:
            try:
                return await method(request, timeout=attempts.timeout(), metadata=self._options.metadata)
            except grpc.RpcError as e:
                error = from_rpc_error(e)
                wait = attempts.after_failure(error)
                if wait is None:
                    raise error from None
            await asyncio.sleep(wait)  # the backoff before the next attempt

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
